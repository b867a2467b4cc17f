"""The data stage on tiny teachers: shards checked against a full teacher forward, mapping, masking,
pruning, fingerprints, resumption and parallel equality."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

from conftest import SENTENCES, in_dir, make_config
from mergedistill.cli import main
from mergedistill.config import load_config
from mergedistill.data.packing import SpecialLayout
from mergedistill.data.shards import open_shard
from mergedistill.data.stage import ShardBuilder, load_manifest
from mergedistill.data.topk import topk_at_masked, topk_naive
from mergedistill.errors import UserError
from mergedistill.models.mlm import masked_logits
from mergedistill.tokens import CLS_ID, MASK_ID, PAD_ID, SEP_ID
from mergedistill.vocab.stage import load_vocab

ROUTING = {"en": "wp", "de": "wp", "ru": "uni", "fr": "bbpe", "zh": "spbpe", "ja": "multi"}
# float32 teachers: the shards are compared with a float32 forward (`auto` is bfloat16 on CPUs with native bf16)
DATA = {"seq_len": 32, "shard_lines": 10, "splits": ["train"], "batch_size": 4, "teacher_dtype": "float32"}


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("data-corpora")
    out = {}
    for lang, sents in SENTENCES.items():
        p = root / f"{lang}.txt"
        # vary the lines so sequences differ in length and content
        lines = [f"{s} {' '.join(sents[(i + 1) % len(sents)].split()[: i % 5])}" for i, s in enumerate(sents * 8)]
        p.write_text("\n".join(lines) + "\n", encoding="utf-8")
        out[lang] = p
    return out


def build(workdir: Path, teachers, corpora, extra=(), **sections):
    sections.setdefault("data", DATA)
    cfg_path = make_config(workdir / "c.yaml", teachers, corpora, ROUTING, **sections)
    assert main(["vocab", "--config", str(cfg_path)]) == 0
    assert main(["data", "--config", str(cfg_path), *extra]) == 0
    return load_config(cfg_path)


def shards_of(workdir: Path, lang: str, split: str = "train") -> list[Path]:
    return sorted((workdir / "runs/t/data" / lang / split).glob("shard-*.arrow"))


def read_all(workdir: Path) -> dict[str, list[dict]]:
    out = {}
    for lang in ROUTING:
        rows = []
        for p in shards_of(workdir, lang):
            rows += list(open_shard(p).with_format("numpy"))
        out[lang] = rows
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_teachers, corpora):
    work = tmp_path_factory.mktemp("data-build")
    with in_dir(work):
        cfg = build(work, tiny_teachers, corpora)
    return work, cfg


@pytest.fixture
def here(built, monkeypatch):
    """The module's shared build, with the current directory set to it (outputs are cwd-relative)."""
    monkeypatch.chdir(built[0])
    return built


def _inverse(idmap: np.ndarray, size: int) -> np.ndarray:
    inv = np.full(size, -1, dtype=np.int64)
    inv[idmap[idmap >= 0]] = np.flatnonzero(idmap >= 0)
    return inv


@pytest.mark.parametrize("lang", list(ROUTING))
def test_shards_hold_the_full_forward_top_k_in_student_ids(here, tiny_teachers, lang):
    """Rebuild each sequence's teacher input from the shard, run the whole teacher (every position,
    full logits) and compare its top-k at the masked positions, mapped to student ids."""
    work, cfg = here
    name = ROUTING[lang]
    vocab, _ = load_vocab(cfg)
    inv = _inverse(vocab.idmaps[name], vocab.size)
    model = AutoModelForMaskedLM.from_pretrained(str(tiny_teachers[name])).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_teachers[name]))
    specials = {tok.pad_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id}
    rows = read_all(work)[lang]
    assert rows
    for row in rows:
        t_in = torch.from_numpy(inv[row["input_ids"]])[None]  # (1, L) teacher ids
        assert (t_in >= 0).all()
        with torch.no_grad():
            logits = model(input_ids=t_in).logits[0, row["positions"]]  # (M, V)
        logits[:, sorted(specials)] = float("-inf")
        ref_val, ref_ids = logits.topk(cfg.data.top_k, dim=-1)
        got_ids = row["topk_ids"].reshape(-1, cfg.data.top_k)
        got_val = row["topk_logits"].reshape(-1, cfg.data.top_k)
        assert (got_ids == vocab.idmaps[name][ref_ids.numpy()]).all()
        np.testing.assert_allclose(got_val, ref_val.numpy(), rtol=2e-3, atol=2e-3)  # stored as float16
        # the log-normaliser at each stored temperature: exact probabilities of the top-k
        temps = cfg.data.lse_temperatures
        got_lse = row["topk_lse"].reshape(-1, len(temps))
        for j, t in enumerate(temps):
            np.testing.assert_allclose(got_lse[:, j], torch.logsumexp(logits / t, -1).numpy(), rtol=1e-5, atol=1e-5)
        assert len(row["kd_positions"]) == 0  # data.unmasked_kd_prob is 0 by default


@pytest.mark.parametrize("lang", ["de", "ru", "fr", "zh"])
def test_unmasked_inputs_are_the_student_tokenizer_ids_of_the_packed_lines(here, corpora, lang):
    """Rows are [CLS] line [SEP] line ... [SEP] in the teacher's own pair layout: one [SEP] between lines for
    BERT-style teachers, two for RoBERTa-style ones (<s> a </s></s> b </s>), mapped to student ids."""
    work, cfg = here
    student = AutoTokenizer.from_pretrained(str(work / "vocab/t/tokenizers" / ROUTING[lang]))
    layout = SpecialLayout.of(student)  # the teacher's pair layout, in student ids
    assert layout.prefix == [CLS_ID] and layout.suffix == [SEP_ID] and set(layout.mid) == {SEP_ID}
    mid = len(layout.mid)
    lines = [x.strip() for x in corpora[lang].read_text(encoding="utf-8").splitlines() if x.strip()]  # as the stage reads them
    room = cfg.data.seq_len - 2  # a line longer than a sequence is split into pieces that fill one each
    expected = []
    for line in lines:
        ids = student(line, add_special_tokens=False)["input_ids"]
        expected += [ids[i:i + room] for i in range(0, len(ids), room)]
    got = []
    for row in read_all(work)[lang]:
        ids = row["input_ids"].astype(np.int64).copy()
        ids[row["positions"]] = row["labels"]
        assert ids[0] == CLS_ID and ids[-1] == SEP_ID
        body = ids[1:-1].tolist()
        piece: list[int] = []
        i = 0
        while i < len(body):
            if body[i] == SEP_ID:
                assert body[i:i + mid] == [SEP_ID] * mid and (i + mid >= len(body) or body[i + mid] != SEP_ID), body
                got.append(piece)
                piece = []
                i += mid
            else:
                piece.append(body[i])
                i += 1
        got.append(piece)
    assert got == expected


def test_masking_statistics(here):
    work, cfg = here
    rows = [r for rs in read_all(work).values() for r in rs]
    eligible = masked = as_mask = kept = 0
    for r in rows:
        ids = r["input_ids"]
        pos = r["positions"]
        n_eligible = int(np.isin(ids, [CLS_ID, SEP_ID, PAD_ID], invert=True).sum())
        assert len(pos) == max(1, round(cfg.data.mask_prob * n_eligible))  # exact per sequence
        assert not np.isin(r["labels"], [CLS_ID, SEP_ID, PAD_ID, MASK_ID]).any(), "a special token was masked"
        assert (np.diff(pos) > 0).all()
        eligible += n_eligible
        masked += len(pos)
        as_mask += int((ids[pos] == MASK_ID).sum())
        kept += int((ids[pos] == r["labels"]).sum())
    assert abs(masked / eligible - cfg.data.mask_prob) < 0.03
    assert 0.7 < as_mask / masked < 0.9 and 0.05 < kept / masked < 0.2


@pytest.mark.parametrize("name", ["wp", "uni", "spbpe", "bbpe"])
def test_fast_path_equals_reference_on_each_family(tiny_teachers, name):
    model = AutoModelForMaskedLM.from_pretrained(str(tiny_teachers[name])).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, model.config.vocab_size, (3, 17), generator=g)
    att = torch.ones_like(ids)
    att[1, 12:] = 0
    sel = torch.rand(ids.shape, generator=g) < 0.3
    sel &= att.bool()
    allowed = torch.rand(model.config.vocab_size, generator=g) < 0.7
    a_ids, a_val = topk_at_masked(model, ids, att, sel, 5, allowed)
    b_ids, b_val = topk_naive(model, ids, att, sel, 5, allowed)
    assert a_ids.shape == (int(sel.sum()), 5)
    assert torch.equal(a_ids, b_ids)
    torch.testing.assert_close(a_val, b_val, rtol=1e-5, atol=1e-5)
    assert allowed[a_ids].all()


def test_pruned_tokens_are_dropped_from_teacher_predictions(workdir, tiny_teachers, corpora):
    cfg = build(workdir, tiny_teachers, corpora, vocab={"prune": True, "keep_single_chars": False})
    vocab, _ = load_vocab(cfg)
    name, lang = "multi", "ja"  # the multilingual teacher on one language: most of its vocabulary is pruned
    idmap = vocab.idmaps[name]
    assert (idmap < 0).sum() > 50
    inv = _inverse(idmap, vocab.size)
    model = AutoModelForMaskedLM.from_pretrained(str(tiny_teachers[name])).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_teachers[name]))
    allowed = torch.from_numpy(idmap >= 0)
    allowed[[tok.pad_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id]] = False
    pruned_best = 0
    for row in read_all(workdir)[lang]:
        got = row["topk_ids"].reshape(-1, cfg.data.top_k)
        assert (inv[got] >= 0).all(), "a stored prediction is not a kept token of the teacher"
        t_in = torch.from_numpy(inv[row["input_ids"]])[None]
        with torch.no_grad():
            logits = model(input_ids=t_in).logits[0, row["positions"]]
        pruned_best += int((~allowed[logits.argmax(-1)]).sum())
        ref = logits.masked_fill(~allowed, float("-inf")).topk(cfg.data.top_k, dim=-1)
        assert (got == idmap[ref.indices.numpy()]).all()
        np.testing.assert_allclose(row["topk_logits"].reshape(-1, cfg.data.top_k), ref.values.numpy(), rtol=2e-3, atol=2e-3)
    assert pruned_best > 0, "the test needs positions where the teacher's favourite token was pruned"


def test_shards_refuse_another_vocabulary(workdir, tiny_teachers, corpora):
    cfg = build(workdir, tiny_teachers, corpora)
    _, old = load_vocab(cfg)
    shard = shards_of(workdir, "de")[0]
    # a different vocabulary for the same run (pruned now): old shards and manifest are refused
    cfg2 = make_config(workdir / "c.yaml", tiny_teachers, corpora, ROUTING, data=DATA, vocab={"prune": True})
    assert main(["vocab", "--config", str(cfg2)]) == 0
    _, new = load_vocab(load_config(cfg2))
    assert new["vocab"] != old["vocab"]
    with pytest.raises(UserError, match="rerun `mergedistill data`"):
        load_manifest(load_config(cfg2), new["vocab"])
    with pytest.raises(UserError, match="built for vocabulary"):
        open_shard(shard, expect_vocab=new["vocab"])
    # and the data stage rebuilds them for the new vocabulary
    assert main(["data", "--config", str(cfg2)]) == 0
    assert load_manifest(load_config(cfg2), new["vocab"])["vocab"] == new["vocab"]


def _shard_bytes(workdir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(workdir / "runs/t/data")): p.read_bytes() for p in sorted((workdir / "runs/t/data").rglob("shard-*.arrow"))}


def test_resume_after_a_crash_gives_identical_shards(built, tmp_path, tiny_teachers, corpora, monkeypatch):
    ref, crash = built[0], tmp_path / "crash"  # the module's build: the same config, uninterrupted
    crash.mkdir()
    monkeypatch.chdir(crash)
    real = ShardBuilder.build
    calls = {"n": 0}

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt  # as if killed mid-run
        return real(self, *a, **k)

    monkeypatch.setattr(ShardBuilder, "build", dying)
    cfg_path = make_config(crash / "c.yaml", tiny_teachers, corpora, ROUTING, data=DATA)
    assert main(["vocab", "--config", str(cfg_path)]) == 0
    assert main(["data", "--config", str(cfg_path)]) == 130
    assert not (crash / "runs/t/data/manifest.json").exists()
    assert 0 < len(_shard_bytes(crash)) < len(_shard_bytes(ref))
    (crash / "runs/t/data/de/train/.shard-00009.arrow.a1b2c3.tmp").write_bytes(b"half a shard")  # debris of a kill
    monkeypatch.setattr(ShardBuilder, "build", real)
    assert main(["data", "--config", str(cfg_path)]) == 0
    assert _shard_bytes(crash) == _shard_bytes(ref)


def test_kill_9_then_rerun_gives_identical_shards(tmp_path, tiny_teachers, corpora, monkeypatch):
    big = {}
    for lang, p in corpora.items():  # a longer corpus, so the kill lands mid-run
        big[lang] = tmp_path / f"big-{lang}.txt"
        big[lang].write_text(p.read_text(encoding="utf-8") * 3, encoding="utf-8")
    dirs = {}
    for tag in ("ref", "killed"):
        d = dirs[tag] = tmp_path / tag
        d.mkdir()
        monkeypatch.chdir(d)
        make_config(d / "c.yaml", tiny_teachers, big, ROUTING, data=DATA)
        assert main(["vocab", "--config", "c.yaml"]) == 0
    monkeypatch.chdir(dirs["ref"])
    assert main(["data", "--config", "c.yaml"]) == 0
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent.parent))
    proc = subprocess.Popen([sys.executable, "-m", "mergedistill", "data", "--config", "c.yaml"], cwd=dirs["killed"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(list((dirs["killed"] / "runs").rglob("shard-*.json"))) < 2:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (dirs["killed"] / "runs/t/data/manifest.json").exists(), "the run finished before the kill: make the corpus longer"
    monkeypatch.chdir(dirs["killed"])
    assert main(["data", "--config", "c.yaml"]) == 0
    assert _shard_bytes(dirs["killed"]) == _shard_bytes(dirs["ref"])


def _assert_same_shards(a: Path, b: Path) -> None:
    ra, rb = read_all(a), read_all(b)
    for lang in ROUTING:
        assert len(ra[lang]) == len(rb[lang])
        for x, y in zip(ra[lang], rb[lang]):
            for col in ("input_ids", "positions", "labels", "topk_ids"):
                assert (x[col] == y[col]).all(), col
            np.testing.assert_allclose(x["topk_logits"], y["topk_logits"], rtol=2e-3, atol=2e-3)


def test_two_local_workers_give_the_same_shards_as_one(built, tmp_path, tiny_teachers, corpora, monkeypatch):
    one, two = built[0], tmp_path / "two"  # the module's build: the same config, one worker
    two.mkdir()
    monkeypatch.chdir(two)
    build(two, tiny_teachers, corpora, data=dict(DATA, workers=2))
    _assert_same_shards(one, two)


def test_two_launcher_ranks_split_the_work_and_the_last_writes_the_manifest(built, tmp_path, tiny_teachers, corpora, monkeypatch):
    one, ranks = built[0], tmp_path / "ranks"  # the module's build: the same config, one process
    ranks.mkdir()
    monkeypatch.chdir(ranks)
    cfg_path = make_config(ranks / "c.yaml", tiny_teachers, corpora, ROUTING, data=DATA)
    assert main(["vocab", "--config", str(cfg_path)]) == 0
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["data", "--config", str(cfg_path)]) == 0
    assert not (ranks / "runs/t/data/manifest.json").exists()
    n_rank1 = len(_shard_bytes(ranks))
    assert 0 < n_rank1 < len(_shard_bytes(one))
    monkeypatch.setenv("RANK", "0")
    assert main(["data", "--config", str(cfg_path)]) == 0
    assert (ranks / "runs/t/data/manifest.json").exists()
    _assert_same_shards(one, ranks)


def test_manifest_counts_and_bytes(here):
    work, cfg = here
    vocab, vrec = load_vocab(cfg)
    m = load_manifest(cfg, vrec["vocab"])
    assert m["k"] == cfg.data.top_k and m["id_dtype"] == "uint16" and m["vocab_size"] == vocab.size
    de = m["languages"]["de"]["splits"]["train"]
    assert de["lines"] == 32 and len(de["shards"]) == 4
    on_disk = sum(p.stat().st_size for p in (work / "runs/t/data").rglob("shard-*.arrow"))
    assert m["totals"]["bytes"] == on_disk


def test_bad_teacher_model_folder_is_refused(workdir, tiny_teachers, corpora, capsys):
    import shutil

    headless = workdir / "headless"
    shutil.copytree(tiny_teachers["wp"], headless)
    (headless / "model.safetensors").unlink()
    cfg_path = make_config(workdir / "c.yaml", dict(tiny_teachers, wp=headless), corpora, ROUTING, data=DATA)
    assert main(["vocab", "--config", str(cfg_path)]) == 0
    assert main(["data", "--config", str(cfg_path)]) == 2
    assert "teachers.wp" in capsys.readouterr().err
    assert not (workdir / "runs/t/data/manifest.json").exists()


def test_data_before_vocab_says_what_to_run(workdir, tiny_teachers, corpora, capsys):
    cfg_path = make_config(workdir / "c.yaml", tiny_teachers, corpora, ROUTING, data=DATA)
    assert main(["data", "--config", str(cfg_path)]) == 2
    assert "run `mergedistill vocab" in capsys.readouterr().err


def test_max_lines_caps_each_corpus(workdir, tiny_teachers, corpora):
    cfg = build(workdir, tiny_teachers, corpora, data=dict(DATA, max_lines=15))
    _, vrec = load_vocab(cfg)
    m = load_manifest(cfg, vrec["vocab"])
    assert all(lang["splits"]["train"]["lines"] == 15 for lang in m["languages"].values())


def test_whole_word_masking_and_dupe_factor(workdir, tiny_teachers, corpora):
    cfg = build(workdir, tiny_teachers, corpora, data=dict(DATA, whole_word_mask=True, dupe_factor=2))
    vocab, vrec = load_vocab(cfg)
    m = load_manifest(cfg, vrec["vocab"])
    de = m["languages"]["ru"]["splits"]["train"]
    rows = read_all(workdir)["ru"]  # the tiny Unigram teacher splits Russian words into several pieces
    inv = _inverse(vocab.idmaps["uni"], vocab.size)
    tok = AutoTokenizer.from_pretrained(str(tiny_teachers["uni"]))
    checked = 0
    for row in rows:
        gold = row["input_ids"].astype(np.int64).copy()
        gold[row["positions"]] = row["labels"]
        pieces = tok.convert_ids_to_tokens(inv[gold].tolist())
        masked = set(row["positions"].tolist())
        for i, p in enumerate(pieces):
            if 1 < i < len(pieces) - 1 and not p.startswith("▁") and p not in tok.all_special_tokens \
                    and pieces[i - 1] not in tok.all_special_tokens:
                # a continuation piece is masked exactly when the piece before it (same word) is
                assert (i in masked) == (i - 1 in masked), (pieces, sorted(masked))
                checked += 1
    assert checked > 20
    assert de["sequences"] == len(rows)
    by_input = {}
    for row in (r for rs in read_all(workdir).values() for r in rs):
        gold = row["input_ids"].astype(np.int64).copy()
        gold[row["positions"]] = row["labels"]
        by_input.setdefault(gold.tobytes(), []).append(tuple(row["positions"].tolist()))
    assert all(len(v) % 2 == 0 for v in by_input.values()), "each sequence comes in dupe_factor = 2 copies"
    pairs = [v for v in by_input.values() if len(v) == 2]
    # each copy draws its own mask: with a few words per sequence some copies coincide, most do not
    assert len(pairs) >= 20 and sum(a != b for a, b in pairs) >= len(pairs) // 2, "copies share their masks"


@pytest.mark.parametrize("name", ["wp", "bbpe"])
def test_allowed_ids_restrict_the_decoder(tiny_teachers, name):
    """With `allowed`, the decoder computes the allowed rows only (its full forward never runs), with the
    full head's numbers at those ids; with fewer allowed ids than k, the full head pads with -inf."""
    model = AutoModelForMaskedLM.from_pretrained(str(tiny_teachers[name])).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, model.config.vocab_size, (2, 11), generator=g)
    att = torch.ones_like(ids)
    sel = torch.rand(ids.shape, generator=g) < 0.4
    allowed = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    allowed[torch.randperm(model.config.vocab_size, generator=g)[:40]] = True
    calls = []
    hook = model.get_output_embeddings().register_forward_hook(lambda *a: calls.append(1))
    try:
        r_ids, r_val = topk_at_masked(model, ids, att, sel, 5, allowed)
        assert not calls, "the full decoder ran although the allowed ids restrict it"
        columns = allowed.nonzero().squeeze(1)
        sub = masked_logits(model, ids, att, sel, columns=columns)
        full = masked_logits(model, ids, att, sel)
        assert sub.shape == (int(sel.sum()), 40)
        torch.testing.assert_close(sub, full[:, columns], rtol=1e-5, atol=1e-5)
        n_ids, n_val = topk_naive(model, ids, att, sel, 5, allowed)
        assert torch.equal(r_ids, n_ids) and allowed[r_ids].all()
        torch.testing.assert_close(r_val, n_val, rtol=1e-5, atol=1e-5)
        few = torch.zeros_like(allowed)
        few[[7, 9]] = True
        f_ids, f_val = topk_at_masked(model, ids, att, sel, 5, few)
        assert f_ids.shape == (int(sel.sum()), 5) and torch.isinf(f_val[:, 2:]).all()
        assert set(f_ids[:, :2].reshape(-1).tolist()) <= {7, 9}
    finally:
        hook.remove()


def test_a_teacher_line_cap_limits_the_lines_it_labels(workdir, tiny_teachers, corpora):
    """teachers.<name>.max_lines caps its languages' lines (below data.max_lines); other languages keep theirs."""
    build(workdir, tiny_teachers, corpora, extra=["--teachers.wp.max_lines=12", "--data.max_lines=30"])
    cfg = load_config(workdir / "c.yaml", ["--teachers.wp.max_lines=12", "--data.max_lines=30"])
    manifest = load_manifest(cfg, load_vocab(cfg)[1]["vocab"])
    lines = {lang: entry["splits"]["train"]["lines"] for lang, entry in manifest["languages"].items()}
    total = {lang: sum(1 for t in corpora[lang].read_text(encoding="utf-8").splitlines() if t.strip()) for lang in ROUTING}
    assert lines["en"] == lines["de"] == 12  # routed to wp
    assert all(lines[lang] == min(30, total[lang]) for lang in ("ru", "fr", "zh", "ja")) and min(total.values()) > 12
    with pytest.raises(UserError, match=r"teachers\.wp\.max_lines: 0 is out of range; allowed: >= 1"):
        load_config(workdir / "c.yaml", ["--teachers.wp.max_lines=0"])


def test_valid_max_sequences_keeps_the_first_valid_sequences_only(tmp_path, tiny_teachers, corpora, monkeypatch):
    """data.valid_max_sequences: each valid shard keeps (and labels) its first N packed sequences; the
    train shards are untouched; the setting is part of the shards' inputs."""
    import yaml

    def run(folder: Path, cap: int | None) -> tuple[dict, dict]:
        folder.mkdir()
        monkeypatch.chdir(folder)
        path = make_config(folder / "c.yaml", tiny_teachers, corpora, ROUTING,
                           data=dict(DATA, splits=["train", "valid"], valid_max_sequences=cap))
        cfg = yaml.safe_load(path.read_text())
        for lang in ROUTING:
            cfg["languages"][lang]["valid"] = str(corpora[lang])
        path.write_text(yaml.safe_dump(cfg))
        assert main(["vocab", "--config", str(path)]) == 0
        assert main(["data", "--config", str(path)]) == 0
        c = load_config(path)
        man = load_manifest(c, load_vocab(c)[1]["vocab"])
        rows = {lang: [list(open_shard(p).with_format("numpy")) for p in shards_of(folder, lang, "valid")] for lang in ROUTING}
        return man, rows

    full_man, full = run(tmp_path / "all", None)
    capped_man, capped = run(tmp_path / "capped", 3)
    for lang in ROUTING:
        assert len(capped[lang]) == len(full[lang]) >= 2
        assert max(len(shard) for shard in full[lang]) > 3
        for cap_rows, full_rows in zip(capped[lang], full[lang]):
            assert len(cap_rows) == min(3, len(full_rows))
            for a, b in zip(cap_rows, full_rows):  # the same first sequences (own masks: compare where neither masks)
                assert len(a["input_ids"]) == len(b["input_ids"])
                keep = np.ones(len(a["input_ids"]), bool)
                keep[a["positions"]] = keep[b["positions"]] = False
                assert (a["input_ids"][keep] == b["input_ids"][keep]).all()
        v_full, v_cap = full_man["languages"][lang]["splits"]["valid"], capped_man["languages"][lang]["splits"]["valid"]
        assert v_cap["sequences"] == sum(map(len, capped[lang])) < v_full["sequences"]
        assert 0 < v_cap["corpus_tokens"] < v_full["corpus_tokens"]
        assert v_cap["lines"] == v_full["lines"]  # every line is read; the sequences past the cap are not labelled
        assert capped_man["languages"][lang]["splits"]["train"] == full_man["languages"][lang]["splits"]["train"]
        for p, q in zip(shards_of(tmp_path / "capped", lang), shards_of(tmp_path / "all", lang)):
            assert p.read_bytes() == q.read_bytes()


def test_unmasked_positions_are_labelled_too_and_the_masking_stays_the_same(here, tmp_path, tiny_teachers, corpora, monkeypatch):
    """data.unmasked_kd_prob labels a share of the unmasked tokens (the teacher's top-k at each, from the same
    forward pass) and leaves the masked positions and inputs exactly as without it."""
    work, cfg = here
    monkeypatch.chdir(tmp_path)
    cfg2 = build(tmp_path, tiny_teachers, corpora, data={**DATA, "unmasked_kd_prob": 0.3})
    vocab, _ = load_vocab(cfg2)
    k = cfg2.data.top_k
    for lang in ("de", "ru"):
        name = ROUTING[lang]
        inv = _inverse(vocab.idmaps[name], vocab.size)
        model = AutoModelForMaskedLM.from_pretrained(str(tiny_teachers[name])).eval()
        tok = AutoTokenizer.from_pretrained(str(tiny_teachers[name]))
        specials = {tok.pad_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id}
        before = read_all(work)[lang]
        after = read_all(tmp_path)[lang]
        assert len(before) == len(after)
        extra = 0
        for a, b in zip(before, after):
            assert (a["input_ids"] == b["input_ids"]).all() and (a["positions"] == b["positions"]).all()
            kd = b["kd_positions"]
            extra += len(kd)
            assert not set(kd.tolist()) & set(b["positions"].tolist())
            t_in = torch.from_numpy(inv[b["input_ids"]])[None]
            assert not set(t_in[0, kd].tolist()) & specials
            allpos = np.sort(np.concatenate([b["positions"], kd])).astype(np.int64)
            with torch.no_grad():
                logits = model(input_ids=t_in).logits[0, allpos]
            logits[:, sorted(specials)] = float("-inf")
            ref_ids = logits.topk(k, dim=-1).indices
            assert (b["topk_ids"].reshape(-1, k) == vocab.idmaps[name][ref_ids.numpy()]).all()
        unmasked = sum(len(r["input_ids"]) - 2 - len(r["positions"]) for r in after)  # roughly: [CLS] and a [SEP] each
        assert 0.2 < extra / unmasked < 0.4


def test_shards_of_an_older_format_are_refused_with_rerun_data(here, tmp_path):
    import json
    import shutil

    work, _ = here
    src = shards_of(work, "de")[0]
    dst = tmp_path / src.name
    shutil.copy(src, dst)
    rec = json.loads(src.with_suffix(".json").read_text())
    rec["format"] = 2
    dst.with_suffix(".json").write_text(json.dumps(rec))
    with pytest.raises(UserError, match="shard format 2.*rerun `mergedistill data`"):
        open_shard(dst)


def test_without_log_normalisers_the_shards_are_smaller_by_their_bytes(here, tmp_path, tiny_teachers, corpora, monkeypatch):
    """data.lse_temperatures: [] stores no log-normaliser (train.kd_target: renormalised then); with [1, 2] each
    labelled position costs 8 bytes more, nothing else changes."""
    work, cfg = here
    monkeypatch.chdir(tmp_path)
    cfg2 = build(tmp_path, tiny_teachers, corpora, data={**DATA, "lse_temperatures": []})
    before, after = read_all(work), read_all(tmp_path)
    for lang in ROUTING:
        for a, b in zip(before[lang], after[lang]):
            assert (a["topk_ids"] == b["topk_ids"]).all() and len(b["topk_lse"]) == 0
    import json

    m1 = json.loads((work / "runs/t/data/manifest.json").read_text())
    m2 = json.loads((tmp_path / "runs/t/data/manifest.json").read_text())
    masked = sum(sp["masked"] for e in m1["languages"].values() for sp in e["splits"].values())
    assert m2["lse_temperatures"] == [] and m1["lse_temperatures"] == [1.0, 2.0]
    # Arrow pads each buffer to 8 bytes: 22 shards x one buffer each
    assert 0 <= m1["totals"]["bytes"] - m2["totals"]["bytes"] - 8 * masked <= 64 * m1["totals"]["shards"]
