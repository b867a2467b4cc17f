import pytest
import torch

from conftest import patterned_texts, tiny_tokenizer
from mergedistill.data.masking import (
    IGNORE_INDEX,
    MLMCollator,
    mask_tokens,
    random_candidates,
    select_positions,
    special_positions,
)
from mergedistill.data.packing import pack_texts

V, MASK, SPECIALS = 1000, 4, [0, 1, 2, 3, 4]  # pad, unk, cls, sep, mask


def batch(rows: int = 256, length: int = 128, seed: int = 0):
    """(rows, length) ids: [CLS] text [SEP] then padding, text lengths varying per row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (rows, length), generator=g)
    lengths = torch.randint(length // 2, length + 1, (rows,), generator=g)
    pos = torch.arange(length)[None, :]
    ids[:, 0] = 2
    ids = torch.where(pos == lengths[:, None] - 1, torch.full_like(ids, 3), ids)
    ids = torch.where(pos >= lengths[:, None], torch.zeros_like(ids), ids)
    return ids


def masked(ids, seed=0, **kw):
    special = special_positions(ids, SPECIALS)
    return mask_tokens(ids, special, MASK, random_candidates(V, SPECIALS), generator=torch.Generator().manual_seed(seed), **kw)


def test_rate_is_mask_prob_per_sequence():
    ids = batch()
    eligible = ~special_positions(ids, SPECIALS)
    m = masked(ids, mask_prob=0.15)
    per_row = m.selected.sum(1)
    expected = torch.clamp(torch.round(eligible.sum(1) * 0.15).long(), min=1)
    assert torch.equal(per_row, expected)
    rate = m.selected.sum() / eligible.sum()
    assert abs(float(rate) - 0.15) < 0.005


def test_specials_never_selected_nor_changed():
    ids = batch()
    special = special_positions(ids, SPECIALS)
    m = masked(ids, mask_prob=0.5)
    assert not (m.selected & special).any()
    assert torch.equal(m.input_ids[special], ids[special])
    assert torch.equal(m.labels[~m.selected], torch.full_like(ids[~m.selected], IGNORE_INDEX))
    assert torch.equal(m.labels[m.selected], ids[m.selected])
    assert torch.equal(m.input_ids[~m.selected], ids[~m.selected])


def test_80_10_10_split_and_random_ids_are_not_special():
    ids = batch(rows=512)
    m = masked(ids, mask_prob=0.3)
    sel = m.selected
    n = int(sel.sum())
    out, orig = m.input_ids[sel], ids[sel]
    to_mask = (out == MASK).float().sum() / n
    kept = (out == orig).float().sum() / n
    randomised = out[(out != MASK) & (out != orig)]
    assert abs(float(to_mask) - 0.8) < 0.01
    assert abs(float(kept) - 0.1) < 0.01  # (a random draw equal to the original adds ~0.1/995)
    assert abs(randomised.numel() / n - 0.1) < 0.01
    assert not torch.isin(randomised, torch.tensor(SPECIALS)).any()


def test_at_least_one_position_when_possible():
    ids = torch.tensor([[2, 7, 8, 3, 0, 0], [2, 3, 0, 0, 0, 0]])  # 2 eligible tokens; none
    m = masked(ids, mask_prob=0.15)
    assert m.selected.sum(1).tolist() == [1, 0]


def test_whole_words_masked_together():
    ids = batch(rows=256)
    special = special_positions(ids, SPECIALS)
    # words of 1 to 3 pieces: word id = running count of word starts, -1 on specials
    g = torch.Generator().manual_seed(1)
    starts = torch.rand(ids.shape, generator=g) < 0.5
    words = torch.cumsum(starts.long(), dim=1)
    words = torch.where(special, torch.full_like(words, -1), words)
    m = masked(ids, mask_prob=0.15, word_ids=words)
    assert not (m.selected & special).any()
    for r in range(ids.shape[0]):
        for w in words[r].unique().tolist():
            if w < 0:
                continue
            group = m.selected[r][words[r] == w]
            assert group.all() or not group.any(), f"row {r}: word {w} split by the mask"
        n_words = words[r][~special[r]].unique().numel()
        n_sel_words = words[r][m.selected[r]].unique().numel()
        assert n_sel_words == max(1, round(0.15 * n_words))
    rate = m.selected.sum() / (~special).sum()
    assert abs(float(rate) - 0.15) < 0.02


def test_whole_word_masking_ignores_unworded_tokens():
    ids = torch.tensor([[2, 10, 11, 12, 13, 3]])
    words = torch.tensor([[-1, 0, 0, -1, -1, -1]])  # only one word; other text tokens have none
    sel = select_positions(special_positions(ids, SPECIALS), 0.5, torch.Generator().manual_seed(0), word_ids=words)
    assert sel.tolist() == [[False, True, True, False, False, False]]


def test_deterministic_given_seed():
    ids = batch()
    a, b, c = masked(ids, seed=5), masked(ids, seed=5), masked(ids, seed=6)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.selected, b.selected)
    assert not torch.equal(a.selected, c.selected)


def test_bad_probabilities_raise():
    ids = batch(rows=2)
    with pytest.raises(ValueError):
        masked(ids, mask_prob=0.0)
    with pytest.raises(ValueError):
        masked(ids, replace_prob=0.9, random_prob=0.2)


def test_collator_masks_dynamically_but_reproducibly():
    tok = tiny_tokenizer("wordpiece")
    p = pack_texts(tok, patterned_texts(64), seq_len=32)
    a = MLMCollator(p, tok, 0.15, seed=0)
    b = MLMCollator(p, tok, 0.15, seed=0)
    first, second = a(list(range(8))), a(list(range(8)))
    assert not torch.equal(first["labels"], second["labels"])  # a new mask each time
    assert torch.equal(first["labels"], b(list(range(8)))["labels"])  # the same sequence of masks per seed
    specials = torch.tensor(tok.all_special_ids)
    assert not torch.isin(p.input_ids[:8].long(), specials)[first["labels"] != -100].any()
