"""Canonical token keys: what a piece means across tokenizer families."""
from mergedistill.tokens import (
    Family,
    byte_level_decoder,
    display,
    key_payload_len,
    piece_key,
)

WP = Family("WordPiece", "wordpiece", prefix="##")
SP = Family("Unigram", "metaspace")
SPB = Family("BPE", "metaspace", byte_fallback=True)
BL = Family("BPE", "bytelevel")


def _bl(data: bytes) -> str:
    """Write bytes as a byte-level BPE token (GPT-2's printable alphabet)."""
    enc = {b: ch for ch, b in byte_level_decoder().items()}
    return "".join(enc[b] for b in data)


def test_word_initial_pieces_agree_across_families():
    assert piece_key("haus", WP) == piece_key("▁haus", SP) == piece_key("Ġhaus", BL) == "Whaus"


def test_continuations_agree_across_families():
    assert piece_key("##ung", WP) == piece_key("ung", SP) == piece_key("ung", BL) == "Cung"


def test_initial_and_continuation_stay_apart():
    assert piece_key("ab", WP) != piece_key("##ab", WP)
    assert piece_key("▁ab", SP) != piece_key("ab", SP)


def test_byte_level_non_ascii_text_is_decoded():
    assert piece_key(_bl(" Grüße".encode()), BL) == "WGrüße"
    assert piece_key(_bl("мир".encode()), BL) == "Cмир"


def test_partial_utf8_bytes_meet_sentencepiece_byte_fallback():
    # the first byte of '你' (e4 bd a0) alone, from a byte-level teacher and from a byte-fallback one
    assert piece_key(_bl(b"\xe4"), BL) == piece_key("<0xE4>", SPB) == "ce4"
    assert piece_key(_bl(b" \xe4\xbd"), BL) == "we4bd"


def test_ascii_byte_fallback_piece_is_not_the_letter():
    assert piece_key("<0x41>", SPB) == "B41"
    assert piece_key("A", SPB) == "CA"
    # without byte fallback, the same string is just text
    assert piece_key("<0x41>", SP) == "C<0x41>"


def test_single_character_payloads():
    assert key_payload_len(piece_key("##a", WP)) == 1
    assert key_payload_len(piece_key("▁", SP)) == 0
    assert key_payload_len(piece_key("<0xE4>", SPB)) == 1
    assert key_payload_len(piece_key("ab", WP)) == 2


def test_display_forms():
    assert display("Whaus") == "▁haus"
    assert display("Cung") == "##ung"
    assert display("we4bd") == "▁<0xE4><0xBD>"
    assert display("S[CLS]") == "[CLS]"
