"""Units of `mergedistill.demo.corpora`: extraction per source format, cleaning, the document split.

Fixtures are hand-written files in tests/fixtures/corpora/ (a LibreOffice-like help page in German
and English with shared ids, a troff man page, a fortune file with ANSI colour codes)."""
from __future__ import annotations

import gzip
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest

from mergedistill.demo.corpora.clean import (
    Deduplicator,
    EnglishFilter,
    normalize,
    size,
    too_short,
)
from mergedistill.demo.corpora.extract import (
    Document,
    drop_tables,
    extract_fortunes,
    extract_help,
    extract_man,
    fortune_paragraphs,
    help_paragraphs,
    is_so_link,
    man_paragraphs,
    render_man,
)
from mergedistill.demo.corpora.language import clean_documents
from mergedistill.demo.corpora.sources import (
    LanguageSpec,
    PackageSpec,
    parse_apt_policy,
)
from mergedistill.demo.corpora.split import doc_position, fill_empty_splits, split_of
from mergedistill.errors import UserError

FIX = Path(__file__).parent / "fixtures" / "corpora"
needs_groff = pytest.mark.skipif(shutil.which("groff") is None,
                                 reason="groff not installed (apt-get install groff-base)")


# ------------------------------------------------------------------------------------------ help

def test_help_extracts_leaf_blocks_with_ids_and_drops_chrome_scripts_code():
    paras = help_paragraphs((FIX / "help_de.html").read_bytes())
    texts = [t for _, t in paras]
    ids = dict((t, k) for k, t in paras)
    assert texts[0] == "Seitenränder im Dokument einstellen" and ids[texts[0]] == "hd_id3150099"
    # whitespace (newlines, runs, &nbsp;) collapsed
    assert "Sie können die Seitenränder für jede Seitenvorlage getrennt festlegen." in texts
    # <li><p>..</p></li>: only the leaf <p>, once; a leaf <li> with bare text counts too (no id)
    assert sum("Format – Seitenvorlage" in t for t in texts) == 1
    assert ids["Geben Sie die gewünschten Abstände in die Felder ein und bestätigen Sie."] is None
    # table cells: <td><p> and a bare <td>
    assert "Die linke Spalte beschreibt den inneren Rand." in texts
    assert "Die rechte Spalte beschreibt den äußeren Rand." in texts
    # inline platform switch: the default variant only
    assert "Drücken Sie Strg+Z, um die letzte Änderung rückgängig zu machen." in texts
    # <br> separates words
    assert "Erste Zeile zweite Zeile des Absatzes" in texts
    joined = " ".join(texts)
    for absent in ("Skripttext", "Code gehört", "MsgBox", "Hilfe für LibreOffice", "Im ausgewählten Modul",
                   "debug info", "This page is", "Befehl"):
        assert absent not in joined, absent


def test_help_ids_are_shared_across_languages():
    de = {k for k, _ in help_paragraphs((FIX / "help_de.html").read_bytes()) if k}
    en = {k for k, _ in help_paragraphs((FIX / "help_en.html").read_bytes()) if k}
    assert {"hd_id3150099", "par_id3154254", "par_id3147762", "par_id1001"} <= de & en


def test_extract_help_names_documents_relative_to_the_language_root(tmp_path):
    page = tmp_path / "usr/share/libreoffice/help/de/text/swriter/guide/margins.html"
    page.parent.mkdir(parents=True)
    shutil.copy(FIX / "help_de.html", page)
    (tmp_path / "usr/share/libreoffice/help/de/noscript.html").write_text("<p>nicht im Textbaum</p>")
    docs = list(extract_help(tmp_path, PackageSpec("libreoffice-help-de", "help", "de")))
    assert [(d.source, d.doc) for d in docs] == [("help", "text/swriter/guide/margins.html")]
    with pytest.raises(UserError, match="libreoffice-help-fr.*sources.py"):
        list(extract_help(tmp_path, PackageSpec("libreoffice-help-fr", "help", "fr")))


# ------------------------------------------------------------------------------------------- man

def test_drop_tables():
    src = b".SH A\nvorher\n.TS H\nl l.\na\tb\n.TE\nnachher\n.TS\nl.\nc\n.TE"
    assert drop_tables(src) == b".SH A\nvorher\nnachher\n"


def test_so_link_pages_are_recognised():
    assert is_so_link((FIX / "link.1").read_bytes())
    assert not is_so_link((FIX / "beispiel.1").read_bytes())


def test_man_paragraphs_split_on_blank_lines_and_indentation_without_header_footer():
    rendered = ("LS(1)          User Commands          LS(1)\n\n\nNAME\n       ls - list\n\n"
                "DESCRIPTION\n       List information about the FILEs, sorted by name.\n\n"
                "       -a, --all\n              do not ignore entries starting with a dot\n\n"
                "GNU coreutils 9.1       September 2022       LS(1)\n")
    assert man_paragraphs(rendered) == [
        "NAME", "ls - list", "DESCRIPTION", "List information about the FILEs, sorted by name.",
        "-a, --all", "do not ignore entries starting with a dot"]


@needs_groff
def test_render_and_extract_man_pages(tmp_path):
    text = render_man((FIX / "beispiel.1").read_bytes())
    assert "Gruß" in text and "\x1b" not in text and "\x08" not in text  # -k decodes UTF-8; -P-cbou: plain
    man1 = tmp_path / "usr/share/man/de/man1"
    man1.mkdir(parents=True)
    for name in ("beispiel.1", "link.1"):
        (man1 / f"{name}.gz").write_bytes(gzip.compress((FIX / name).read_bytes()))
    os.symlink("beispiel.1.gz", man1 / "alias.1.gz")
    docs = list(extract_man(tmp_path, PackageSpec("manpages-de", "man", "de")))
    assert [d.doc for d in docs] == ["man1/beispiel.1.gz"]  # the .so page and the symlink are skipped
    texts = [t for _, t in docs[0].paras]
    assert "beispiel gibt einen freundlichen Gruß aus und beendet sich danach ohne weitere Rückfragen." in texts
    assert "Gibt den Gruß in Großbuchstaben und mit drei Ausrufezeichen aus." in texts
    assert not any("BEISPIEL(1)" in t or "Januar 2024" in t for t in texts)  # header and footer dropped
    assert "Der Rückgabewert folgt den üblichen Konventionen für Programme." in texts
    assert not any("Tabellenzeile" in t or "l l." in t for t in texts)  # tbl tables dropped


# --------------------------------------------------------------------------------------- fortune

def test_fortunes_split_on_percent_lines_and_lose_ansi_codes():
    paras = fortune_paragraphs((FIX / "fortunes_zh").read_text(encoding="utf-8"))
    assert paras[0] == "静夜思 床前明月光，疑是地上霜。 举头望明月，低头思故乡。"
    assert paras[1] == "-- Debian 《行为准则》第一条 请始终假设其他人都在为这一目标而付诸努力。"
    assert paras[2].endswith("100% 真心")  # a % inside a line does not split
    assert len(paras) == 4 and not any("\x1b" in p or "[33m" in p for p in paras)


def test_extract_fortunes_skips_dat_links_empty_and_offensive(tmp_path):
    base = tmp_path / "usr/share/games/fortunes/zh"
    (base / "off").mkdir(parents=True)
    shutil.copy(FIX / "fortunes_zh", base / "tang")
    (base / "tang.dat").write_bytes(b"\x00\x00\x00\x02binary index")
    os.symlink("tang", base / "tang.u8")
    (base / "leer.u8").write_bytes(b"")
    shutil.copy(FIX / "fortunes_zh", base / "off" / "grob")
    docs = list(extract_fortunes(tmp_path, PackageSpec("fortunes-zh", "fortune")))
    assert [(d.source, d.doc, len(d.paras)) for d in docs] == [("fortune", "fortunes/zh/tang", 4)]


# ----------------------------------------------------------------------------------------- clean

def test_normalize_whitespace_invisibles_and_cjk_spacing():
    assert normalize("  a\tb\n\u00a0c\u200b d\u00ad ") == "a b c d"
    assert normalize("Cafe\u0301") == "Café"  # NFC
    assert normalize("床前明月光， 疑是 地上霜。 Debian 社群", cjk=True) == "床前明月光，疑是地上霜。 Debian 社群"
    assert normalize("die  Seite wählen", cjk=False) == "die Seite wählen"


def test_fragments_and_size_units():
    assert too_short("Neu") and too_short("Suchen und") and not too_short("Suchen und ersetzen")
    assert too_short("关联项目", cjk=True) and not too_short("床前明月光疑是", cjk=True)
    assert too_short("Use the Source, Luke", cjk=True)  # no CJK characters at all
    assert size("ein zwei drei") == 3 and size("床前 明月光", cjk=True) == 5


def test_english_filter_restricted_to_target_and_english():
    de = EnglishFilter("de")
    assert de.is_english("Click the Apply button to save the page style for all pages in the current document.")
    assert not de.is_english("Die Ränder gelten für alle Seiten mit dieser Seitenvorlage.")
    assert not EnglishFilter(None).is_english("This is English and stays.")


def test_deduplicator_keeps_first_occurrence():
    d = Deduplicator()
    assert [d.first(t) for t in ("a b c", "x y z", "a b c")] == [True, True, False]


def _split_docs(wanted: str, n: int) -> list[str]:
    return [f"text/{wanted}/{i}.html" for i in range(100_000) if split_of(f"text/{wanted}/{i}.html") == wanted][:n]


def test_clean_documents_drops_english_fragments_and_cross_split_duplicates():
    train_doc, test_doc = _split_docs("train", 1)[0], _split_docs("test", 1)[0]
    valid_doc = _split_docs("valid", 1)[0]
    shared = "Die Ränder gelten für alle Seiten mit dieser Seitenvorlage."
    docs = [  # the held-out doc comes first on purpose: dedup must still keep the copy in train
        Document("help", test_doc, [("p1", shared), ("p2", "Ein eigener Satz nur im Testdokument hier."),
                                    ("p3", "Click the Apply button to save the page style.")]),
        Document("help", train_doc, [("p1", shared), ("p4", "Neu"), ("p5", shared)]),
        Document("help", valid_doc, [(None, "Noch ein Satz nur für die Validierung gedacht.")]),
    ]
    dropped = Counter()
    out = clean_documents(LanguageSpec("de", (), langid="de"), docs, dropped)
    flat = {s: [t for d in out[s] for _, t in d.paras] for s in out}
    assert flat["train"] == [shared]
    assert flat["test"] == ["Ein eigener Satz nur im Testdokument hier."]
    assert dropped == Counter(english=1, tiny=1, duplicate=2)


# ----------------------------------------------------------------------------------------- split

def test_split_is_a_deterministic_document_hash_near_90_5_5():
    docs = [f"text/module{i % 7}/page{i}.html" for i in range(20_000)]
    counts = Counter(split_of(d) for d in docs)
    assert abs(counts["test"] / len(docs) - 0.05) < 0.01 and abs(counts["valid"] / len(docs) - 0.05) < 0.01
    # pinned values: changing the hash would silently reshuffle every corpus (sha256("a") = ca978112...)
    assert [round(doc_position(d), 6) for d in ("a", "man1/ls.1.gz")] == [0.791374, 0.217815]
    assert [split_of(f"text/shared/page{i}.html") for i in range(3, 7)] == ["test", "valid", "train", "test"]


def test_fill_empty_splits_moves_whole_documents_deterministically():
    docs = [f"d{i}" for i in range(6)]
    assignment = {d: "train" for d in docs}
    filled = fill_empty_splits(assignment, {d: True for d in docs}, "xx")
    assert Counter(filled.values()) == Counter(train=4, valid=1, test=1)
    assert filled == fill_empty_splits(dict(reversed(list(assignment.items()))), {d: True for d in docs}, "yy")
    moved = sorted(docs, key=doc_position)[:2]
    assert [filled[d] for d in moved] == ["valid", "test"]
    with pytest.raises(UserError, match=r"\[xx\] only 2 document"):
        fill_empty_splits({"a": "train", "b": "train", "c": "test"}, {"a": True, "b": True, "c": False}, "xx")


def test_parse_apt_policy():
    text = ("libreoffice-help-de:\n  Installed: (none)\n  Candidate: 4:7.4.7-1+deb12u14\n  Version table:\n"
            "     4:7.4.7-1+deb12u14 500\nfortunes-xx:\n  Installed: (none)\n  Candidate: (none)\n")
    assert parse_apt_policy(text) == {"libreoffice-help-de": "4:7.4.7-1+deb12u14"}
