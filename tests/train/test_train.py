"""The train stage on tiny shards: sampling, masked-only gradients, learning, resume, DDP, NaN, export."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

from conftest import SENTENCES, in_dir, make_config
from mergedistill.cli import main
from mergedistill.config import load_config
from mergedistill.train.batches import SampledBatches, expected_passes, sampling_probs

ROUTING = {"en": "wp", "de": "wp", "ru": "uni", "fr": "bbpe"}
DATA = {"seq_len": 32, "shard_lines": 20, "splits": ["train", "valid"], "batch_size": 8}
STUDENT = {"hidden": 32, "heads": 2, "layers": 2, "intermediate": 64, "max_position": 64}
TRAIN = {"max_steps": 30, "val_every": 10, "batch_size": 8, "lr": 0.003, "warmup_steps": 3}


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-corpora")
    out = {}
    for lang in ROUTING:
        sents = SENTENCES[lang]
        lines = [f"{s} {' '.join(sents[(i + 1) % len(sents)].split()[: i % 4])}".strip() for i, s in enumerate(sents * 10)]
        (root / f"{lang}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (root / f"{lang}.valid.txt").write_text("\n".join(lines[:12]) + "\n", encoding="utf-8")
        out[lang] = root / f"{lang}.txt"
    return out


def write_config(workdir: Path, teachers, corpora, **train) -> Path:
    path = make_config(workdir / "c.yaml", teachers, corpora, ROUTING, data=DATA, student=STUDENT, train={**TRAIN, **train})
    import yaml

    cfg = yaml.safe_load(path.read_text())
    for lang in ROUTING:
        cfg["languages"][lang]["valid"] = str(corpora[lang]).replace(".txt", ".valid.txt")
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_teachers, corpora):
    """vocab + data done once; each test copies nothing, it trains into its own run folder."""
    work = tmp_path_factory.mktemp("train-prep")
    with in_dir(work):
        cfg = write_config(work, tiny_teachers, corpora)
        assert main(["vocab", "--config", str(cfg)]) == 0
        assert main(["data", "--config", str(cfg)]) == 0
    return work


@pytest.fixture
def run_dir(prepared, tmp_path, monkeypatch):
    """A fresh folder with the prepared vocab/ and runs/t/data (symlinked), as cwd."""
    (tmp_path / "runs" / "t").mkdir(parents=True)
    os.symlink(prepared / "vocab", tmp_path / "vocab")
    os.symlink(prepared / "runs" / "t" / "data", tmp_path / "runs" / "t" / "data")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def metrics(work: Path, which: str = "train") -> list[dict]:
    from mergedistill.train.stage import read_metrics

    return read_metrics(work / "runs/t" / which)


def series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]


# ---- sampling ----------------------------------------------------------------------------------
def test_sampling_probabilities_follow_the_formula():
    sizes = {"big": 10000, "mid": 1000, "small": 10}
    for alpha in (0.0, 0.3, 1.0):
        p = sampling_probs(sizes, alpha)
        z = sum(v ** alpha for v in sizes.values())
        for k, v in sizes.items():
            assert p[k] == pytest.approx(v ** alpha / z)


def test_expected_passes_are_draws_times_probability_over_sequences():
    probs = {"big": 0.7, "small": 0.3}
    p = expected_passes({"big": 7000, "small": 300}, probs, draws=1000)
    assert p == pytest.approx({"big": 0.1, "small": 1.0})
    # measured against the sampler: 100 batches of 64 draw ~6,400 sequences
    ds = SampledBatches({"big": _Fake(7000), "small": _Fake(300)}, probs, 64, 0, 1, 0, 8)
    drawn = np.concatenate([ds.draw(b)[0] for b in range(100)])
    assert (drawn == 1).sum() / 300 == pytest.approx(expected_passes({"big": 7000, "small": 300}, probs, 6400)["small"], rel=0.05)
    assert expected_passes({"a": 0}, {"a": 1.0}, 10)["a"] == float("inf")


class _Fake:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


def test_sampled_language_frequencies_match_the_probabilities():
    sizes = {"a": 5000, "b": 500, "c": 50}
    probs = sampling_probs(sizes, 0.3)
    ds = SampledBatches({k: _Fake(v) for k, v in sizes.items()}, probs, global_batch=64, rank=0, world=1, seed=0, k=8)
    counts = np.zeros(3)
    for b in range(400):
        lang, row = ds.draw(b)
        counts += np.bincount(lang, minlength=3)
        assert (row < ds.sizes[lang]).all()
    freq = counts / counts.sum()
    expected = np.array([probs[k] for k in ds.langs])
    assert np.abs(freq - expected).max() < 0.01  # 25,600 draws: standard error ~0.003


def test_ranks_split_the_same_global_batch():
    sizes = {"a": 300, "b": 30}
    probs = sampling_probs(sizes, 0.5)
    one = SampledBatches({k: _Fake(v) for k, v in sizes.items()}, probs, 8, 0, 1, 1, 8)
    lang, row = one.draw(7)
    for r in range(2):
        part = SampledBatches({k: _Fake(v) for k, v in sizes.items()}, probs, 8, r, 2, 1, 8)
        l2, r2 = part.draw(7)
        assert (l2 == lang).all() and (r2 == row).all()  # same draw; rank r keeps rows r, r + 2, ...


def test_rows_read_in_one_take_per_shard_equal_row_by_row_reads(run_dir, tiny_teachers, corpora):
    from mergedistill.data.stage import load_manifest
    from mergedistill.train.batches import LanguageShards, collate
    from mergedistill.vocab.stage import load_vocab

    cfg = load_config(write_config(run_dir, tiny_teachers, corpora))
    _, vrec = load_vocab(cfg)
    man = load_manifest(cfg, vrec["vocab"])
    src = LanguageShards([run_dir / "runs/t/data" / p for p in man["languages"]["de"]["splits"]["train"]["shards"]], vrec["vocab"], man["k"])
    assert len(src.sets) >= 2, "the test needs rows from several shards"
    n = len(src)
    idx = [n - 1, 0, 3, int(src.offsets[1]), 3, int(src.offsets[1]) - 1, n // 2]  # shard borders, repeats, any order
    got, want = src.rows(idx), [src[i] for i in idx]
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for c in w:
            assert np.array_equal(g[c], w[c]), c  # the stored dtypes (uint16, float16); self[i] widens them
    a, b = collate(got, [0] * len(idx), man["k"], lse_col=0), collate(want, [0] * len(idx), man["k"], lse_col=0)
    assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in a.__dict__)
    assert src.rows([]) == []
    with pytest.raises(IndexError):
        src.rows([n])


# ---- the step ----------------------------------------------------------------------------------
def test_gradients_flow_only_from_masked_positions(run_dir, tiny_teachers, corpora, monkeypatch):
    from mergedistill.models import mlm as mlm_models
    from mergedistill.data.stage import load_manifest
    from mergedistill.train.batches import LanguageShards, collate
    from mergedistill.train.module import DistillModule
    from mergedistill.models.student import build_student
    from mergedistill.vocab.stage import load_vocab

    cfg = load_config(write_config(run_dir, tiny_teachers, corpora))
    vocab, vrec = load_vocab(cfg)
    man = load_manifest(cfg, vrec["vocab"])
    src = LanguageShards([run_dir / "runs/t/data" / p for p in man["languages"]["de"]["splits"]["train"]["shards"]], vrec["vocab"], man["k"])
    batch = collate([src[0], src[1]], [0, 0], man["k"])
    cfg.student.embeddings_from_teachers = False
    student, _ = build_student(cfg, vocab, load_teacher=None)
    module = DistillModule(cfg, student, ["de"], vocab=vocab)
    module.log = lambda *a, **k: None
    captured = {}

    # The whole encoder's output at every position (the fast path would compute the last layer at the
    # masked positions only, which tests/models/test_mlm.py checks is exact): no gradient may reach the rest.
    monkeypatch.setattr(mlm_models, "last_layer_splittable", lambda *a: False)

    def keep_hidden(mod, args, out):  # the encoder's output, the input of the MLM head
        captured["h"] = out.last_hidden_state

    student.base_model.encoder.register_forward_hook(keep_hidden)
    loss = module._step(batch, "train")
    h = captured["h"]
    h.retain_grad()
    loss.backward()
    g = h.grad.abs().sum(-1)  # (B, L)
    assert (g[batch.selected] > 0).all()
    assert (g[~batch.selected] == 0).all(), "the loss reached the student through unmasked positions' outputs"


def test_a_few_steps_lower_the_loss_and_export_works(run_dir, tiny_teachers, corpora, caplog):
    cfg = write_config(run_dir, tiny_teachers, corpora, max_steps=60)
    with caplog.at_level("INFO", logger="mergedistill"):
        assert main(["train", "--config", str(cfg)]) == 0
    rows = metrics(run_dir)
    loss = [v for _, v in series(rows, "train/loss")]
    assert np.mean(loss[-2:]) < np.mean(loss[:2]) - 0.3
    val = series(rows, "val/loss")
    assert len(val) >= 2 and val[-1][1] < val[0][1]
    assert series(rows, "val/de/acc") and series(rows, "lr")
    # the detail figures are logged only on the steps the loggers write, and every written step has them
    steps = [s for s, _ in series(rows, "train/loss")]
    assert len(steps) == 6  # 60 steps, a row every 10
    for key in ("train/acc", "train/kd_loss", "train/de/acc", "train/fr/mlm_loss", "train/tokens_per_s", "lr"):
        assert [s for s, _ in series(rows, key)] == steps, key
    export = run_dir / "runs/t/train/export"
    model = AutoModelForMaskedLM.from_pretrained(str(export))
    tok = AutoTokenizer.from_pretrained(str(export / "tokenizers" / "wp"))
    fill = pipeline("fill-mask", model=model, tokenizer=tok, top_k=3)
    out = fill(f"The quick brown {tok.mask_token} jumps over the lazy dog.")
    assert len(out) == 3 and all(o["token"] < model.config.vocab_size and o["token_str"] for o in out)
    readme = (export / "README.md").read_text()
    assert "| de | wp |" in readme and "fill-mask" in readme
    # the card and state say how often each language's masked sequences were read
    state = json.loads((run_dir / "runs/t/train/state.json").read_text())
    manifest = json.loads((run_dir / "runs/t/data/manifest.json").read_text())
    n = {lang: manifest["languages"][lang]["splits"]["train"]["sequences"] for lang in ROUTING}
    sizes = {lang: manifest["languages"][lang]["splits"]["train"]["tokens"] for lang in ROUTING}
    want = expected_passes(n, sampling_probs(sizes, load_config(cfg).train.sampling_alpha), 60 * TRAIN["batch_size"])
    assert state["passes"] == pytest.approx(want)
    assert f"| {want['de']:.1f} |" in readme and "passes" in readme
    over = [lang for lang, p in want.items() if p > 2]
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "passes over the same masked" in r.getMessage()]
    assert over and len(warned) == 1 and all(f"{lang} {want[lang]:.1f}" in warned[0] for lang in over)
    # a rerun with the same settings skips
    assert main(["train", "--config", str(cfg)]) == 0


def test_resume_continues_with_the_same_next_batch_and_weights(run_dir, tiny_teachers, corpora, monkeypatch):
    seen: list[tuple[int, int]] = []
    real = SampledBatches.batch
    crash_at = {"b": None}

    def spy(self, b):
        if b == crash_at["b"]:
            raise RuntimeError("simulated crash")
        out = real(self, b)
        seen.append((b, hash(out.input_ids.numpy().tobytes())))
        return out

    monkeypatch.setattr(SampledBatches, "batch", spy)
    cfg = write_config(run_dir, tiny_teachers, corpora, max_steps=20)
    assert main(["train", "--config", str(cfg)]) == 0
    full = dict(seen)
    w_full = AutoModelForMaskedLM.from_pretrained(str(run_dir / "runs/t/train/export")).state_dict()
    # the same run again, crashing while fetching micro-batch 12 (the checkpoint of step 10 is on disk)
    crash_at["b"] = 12
    assert main(["train", "--config", str(cfg), "--force"]) == 1
    crash_at["b"] = None
    assert not (run_dir / "runs/t/train/export").exists()
    assert main(["train", "--config", str(cfg)]) == 2  # refuses to overwrite without --resume
    seen.clear()
    assert main(["train", "--config", str(cfg), "--resume"]) == 0
    resumed = dict(seen)
    assert min(resumed) == 10, f"resumed at micro-batch {min(resumed)}, expected 10"
    assert all(resumed[b] == full[b] for b in resumed)
    w_res = AutoModelForMaskedLM.from_pretrained(str(run_dir / "runs/t/train/export")).state_dict()
    steps = [s for s, _ in series(metrics(run_dir), "train/loss")]
    assert steps[0] < 10 and steps[-1] >= 19, "the logs of the first attempt were lost on resume"
    for k in w_full:  # same batches, same random state (dropout), same optimizer state: same weights
        torch.testing.assert_close(w_res[k], w_full[k], rtol=1e-4, atol=1e-5)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(run_dir, tiny_teachers, corpora, monkeypatch, capsys):
    import mergedistill.train.module as module_mod

    real = module_mod.batch_loss
    calls = {"n": 0}

    def poisoned(*a, **k):
        out = real(*a, **k)
        calls["n"] += 1
        if calls["n"] >= 25:  # training steps only run here: validation is every 10 steps
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(module_mod, "batch_loss", poisoned)
    cfg = write_config(run_dir, tiny_teachers, corpora)
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "the loss became nan" in err and "--resume" in err
    last = run_dir / "runs/t/train/checkpoints/last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert 0 < ckpt["global_step"] < 25
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert not (run_dir / "runs/t/train/export").exists()


def test_mlm_only_baseline_trains_without_teacher_predictions(run_dir, tiny_teachers, corpora):
    cfg = write_config(run_dir, tiny_teachers, corpora, alpha=0.0, max_steps=10)
    assert main(["train", "--config", str(cfg)]) == 0
    rows = metrics(run_dir)
    assert all(float(v) == 0.0 for _, v in series(rows, "train/kd_loss"))


def test_tensorboard_logger_by_config(run_dir, tiny_teachers, corpora):
    cfg = write_config(run_dir, tiny_teachers, corpora, logger="tensorboard", max_steps=4, val_every=2)
    assert main(["train", "--config", str(cfg)]) == 0
    assert list((run_dir / "runs/t/train/tensorboard").rglob("events.out.tfevents.*"))
    assert series(metrics(run_dir), "train/loss")  # the CSV log is kept beside it


def test_online_mode_runs_the_teachers_in_the_step(run_dir, tiny_teachers, corpora, monkeypatch):
    from mergedistill.train import online

    calls = {"n": 0}
    real = online.OnlineTeachers.predict

    def counted(self, batch):
        calls["n"] += 1
        out = real(self, batch)
        assert out.topk_ids.shape[0] == out.labels.shape[0] == int(out.selected.sum())
        return out

    monkeypatch.setattr(online.OnlineTeachers, "predict", counted)
    cfg = write_config(run_dir, tiny_teachers, corpora, mode="online", max_steps=10)
    assert main(["train", "--config", str(cfg)]) == 0
    assert calls["n"] == 10


def test_ddp_on_two_cpu_processes_matches_one_process(run_dir, tiny_teachers, corpora):
    """2 processes (gloo) x 4 sequences vs 1 process x 8: the same global batches, so the same curve."""
    cfg = write_config(run_dir, tiny_teachers, corpora, max_steps=20)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))  # this checkout's mergedistill
    base = [sys.executable, "-m", "mergedistill", "train", "--config", str(cfg), "--train.accelerator=cpu"]
    one = subprocess.run(base + ["--train.devices=1", "--train.batch_size=8"], cwd=run_dir, env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    v1 = series(metrics(run_dir), "val/loss")
    t1 = series(metrics(run_dir), "train/loss")
    two = subprocess.run(base + ["--force", "--train.devices=2", "--train.strategy=ddp", "--train.batch_size=4"],
                         cwd=run_dir, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    v2 = series(metrics(run_dir), "val/loss")
    t2 = series(metrics(run_dir), "train/loss")
    assert [s for s, _ in v1] == [s for s, _ in v2] and len(v1) == 2
    np.testing.assert_allclose([v for _, v in v2], [v for _, v in v1], rtol=0.02)
    np.testing.assert_allclose([v for _, v in t2], [v for _, v in t1], rtol=0.05)


def test_baseline_takes_nothing_from_the_teachers(run_dir, tiny_teachers, corpora):
    """--baseline: alpha 0 and random init with no embedding rows copied, even when the config asks for them;
    on a copy of the config: the one given (what `run` hands to evaluate next) is left as it was."""
    import copy

    from mergedistill.train.stage import run_train

    cfg = load_config(write_config(run_dir, tiny_teachers, corpora, max_steps=2, val_every=2))
    before = copy.deepcopy(cfg)
    run_train(cfg, baseline=True)
    assert cfg == before and cfg.train.alpha == 0.5
    card = (run_dir / "runs/t/baseline/export/README.md").read_text()
    assert "- initialisation: random;" in card and "embedding rows" not in card  # the card says it in words, not as a dict
    assert "output bias from the log unigram frequencies of the training shards" in card
    state = json.loads((run_dir / "runs/t/baseline/state.json").read_text())
    assert state["inputs"]["train"]["alpha"] == 0.0 and state["inputs"]["student"]["embeddings_from_teachers"] is False
    assert series(metrics(run_dir, "baseline"), "train/kd_loss") and all(
        float(v) == 0.0 for _, v in series(metrics(run_dir, "baseline"), "train/kd_loss"))


def test_output_bias_init_is_the_mixed_unigram_distribution(run_dir, tiny_teachers, corpora):
    from mergedistill.data.stage import load_manifest
    from mergedistill.train.batches import sampling_probs as probs_of
    from mergedistill.train.batches import unigram_log_probs
    from mergedistill.train.stage import ShardDataModule, init_output_bias, make_module
    from mergedistill.vocab.stage import load_vocab

    cfg = load_config(write_config(run_dir, tiny_teachers, corpora))
    vocab, vrec = load_vocab(cfg)
    man = load_manifest(cfg, vrec["vocab"])
    langs = list(man["languages"])
    dm = ShardDataModule(cfg, man, vrec["vocab"], langs)
    module, _ = make_module(cfg, vocab, langs)
    init_output_bias(module.student, dm, cfg.train.sampling_alpha)
    bias = module.student.get_output_embeddings().bias.detach().double()
    sources = dm._sources("train")
    probs = probs_of(dm.sizes(), cfg.train.sampling_alpha)
    # by hand: per-language gold-token frequencies, mixed with the sampling probabilities, add-one smoothed
    mix = np.zeros(len(bias))
    total = 0
    for lang, src in sources.items():
        labels = np.concatenate([np.concatenate(list(s[:]["labels"])) for s in src.sets]).astype(np.int64)
        c = np.bincount(labels, minlength=len(bias)).astype(float)
        mix += probs[lang] * c / c.sum()
        total += len(labels)
    expected = np.log((mix / mix.sum() * total + 1) / (total + len(bias)))
    np.testing.assert_allclose(bias.numpy(), expected, rtol=0, atol=1e-5)
    assert torch.exp(bias).sum().item() == pytest.approx(1.0, abs=1e-4)
    np.testing.assert_allclose(unigram_log_probs(sources, probs, len(bias)).numpy(), expected, atol=1e-9)
    # the head predicts from the bias: with zero hidden states the argmax is the most frequent gold token
    assert int(module.student.get_output_embeddings()(torch.zeros(1, cfg.student.hidden)).argmax()) == int(np.argmax(mix))


def test_a_checkpoint_from_other_settings_is_never_continued(run_dir, tiny_teachers, corpora, capsys, caplog):
    """A finished run, then the settings change: --resume is refused (exit 2); `run`/`ablate`
    (restart_if_changed) start over from step 0 instead of exporting the old checkpoint."""
    import logging

    from mergedistill.train.stage import run_train

    cfg = write_config(run_dir, tiny_teachers, corpora, max_steps=4, val_every=2)
    assert main(["train", "--config", str(cfg)]) == 0
    assert main(["train", "--config", str(cfg), "--resume", "--train.lr=0.01"]) == 2
    assert "belongs to a run with other settings" in capsys.readouterr().err
    state = run_dir / "runs/t/train/state.json"
    old = json.loads(state.read_text())
    with caplog.at_level(logging.INFO, logger="mergedistill"):
        run_train(load_config(cfg, ["--train.lr=0.01", "--train.max_steps=3"]), restart_if_changed=True)
    assert "starting over" in caplog.text
    new = json.loads(state.read_text())
    assert new["steps"] == 3 and new["inputs"]["train"]["lr"] == 0.01 and new["inputs"] != old["inputs"]
    metrics_steps = [s for s, _ in series(metrics(run_dir), "train/loss")]
    assert metrics_steps and max(metrics_steps) <= 3  # a fresh log, not the old run's


# ---- no lost work -----------------------------------------------------------------------------------
def test_a_replaced_student_waits_in_train_prev_until_the_new_one_is_exported(run_dir, tiny_teachers, corpora, monkeypatch):
    import mergedistill.train.stage as stage

    cfg = write_config(run_dir, tiny_teachers, corpora, max_steps=2, val_every=2)
    assert main(["train", "--config", str(cfg)]) == 0
    train, prev = run_dir / "runs/t/train", run_dir / "runs/t/train.prev"
    old_weights = (train / "export/model.safetensors").read_bytes()
    seen = {}
    real_export, real_fit = stage.export_student, stage.L.Trainer.fit

    def fit(self, *a, **k):  # training has started: the old student is aside, whole
        seen["at_fit"] = (prev / "export/model.safetensors").read_bytes() == old_weights and not (train / "export").exists()
        return real_fit(self, *a, **k)

    def export(*a, **k):
        seen["at_export"] = (prev / "export/model.safetensors").is_file()
        return real_export(*a, **k)

    monkeypatch.setattr(stage.L.Trainer, "fit", fit)
    monkeypatch.setattr(stage, "export_student", export)
    assert main(["train", "--config", str(cfg), "--restart-if-changed", "--train.lr=0.01"]) == 0
    assert seen == {"at_fit": True, "at_export": True}
    assert not prev.exists() and (train / "export/model.safetensors").read_bytes() != old_weights


def test_a_new_run_that_fails_to_start_keeps_the_trained_student(run_dir, tiny_teachers, corpora, monkeypatch, capsys):
    """A student that cannot be built (a teacher layer that does not load) fails before anything moves."""
    import mergedistill.train.stage as stage

    cfg = write_config(run_dir, tiny_teachers, corpora, max_steps=2, val_every=2)
    assert main(["train", "--config", str(cfg)]) == 0
    export = run_dir / "runs/t/train/export"
    before = {p.name: p.stat().st_mtime_ns for p in export.iterdir()}

    def broken(*a, **k):
        from mergedistill.errors import UserError

        raise UserError("student.init: cannot build")

    monkeypatch.setattr(stage, "build_student", broken)
    assert main(["train", "--config", str(cfg), "--force"]) == 2
    assert {p.name: p.stat().st_mtime_ns for p in export.iterdir()} == before
    assert not (run_dir / "runs/t/train.prev").exists()


def test_settings_that_do_not_fit_the_teachers_stop_run_before_any_stage(run_dir, tiny_teachers, corpora, capsys):
    cfg = write_config(run_dir, tiny_teachers, corpora, max_steps=2, val_every=2)
    assert main(["train", "--config", str(cfg)]) == 0
    export = run_dir / "runs/t/train/export"
    before = {p.name: p.stat().st_mtime_ns for p in export.iterdir()}
    vocab_stamp = (run_dir / "vocab/t/fingerprint.json").stat().st_mtime_ns
    code = main(["run", "--config", str(cfg), "--student.init=teacher:wp", "--student.hidden=64", "--student.heads=4",
                 "--data.seq_len=100", "--student.max_position=128", "--train.max_steps=3"])
    err = capsys.readouterr().err
    assert code == 2
    assert "student.init: teacher:wp has hidden_size=32, num_attention_heads=2, the student hidden 64, heads 4" in err
    assert "set student.hidden: 32, student.heads: 2" in err
    assert "data.seq_len: 100 tokens per sequence, but teacher wp accepts at most 64" in err
    assert {p.name: p.stat().st_mtime_ns for p in export.iterdir()} == before  # nothing deleted, nothing rebuilt
    assert (run_dir / "vocab/t/fingerprint.json").stat().st_mtime_ns == vocab_stamp


def test_devices_strategy_and_nodes_are_part_of_the_settings(run_dir, tiny_teachers, corpora, capsys, caplog):
    cfg = write_config(run_dir, tiny_teachers, corpora, max_steps=2, val_every=2)
    assert main(["train", "--config", str(cfg)]) == 0
    inputs = json.loads((run_dir / "runs/t/train/state.json").read_text())["inputs"]["train"]
    assert {"devices", "strategy", "num_nodes", "batch_size"} <= set(inputs)
    caplog.set_level("INFO")
    # another global batch (devices x batch_size): not "complete for these inputs"
    assert main(["train", "--config", str(cfg), "--train.devices=2", "--train.strategy=ddp"]) == 2
    assert "skipping" not in caplog.text and "belongs to a run with other settings" in capsys.readouterr().err
    assert main(["train", "--config", str(cfg)]) == 0 and "skipping" in caplog.text  # the same settings still skip


def test_best_checkpoint_is_the_lowest_validation_loss(run_dir, tiny_teachers, corpora):
    cfg = write_config(run_dir, tiny_teachers, corpora, max_steps=8, val_every=2, lr=0.02, warmup_steps=0)
    assert main(["train", "--config", str(cfg)]) == 0
    val = series(metrics(run_dir), "val/loss")
    assert len(val) == 4
    best = json.loads((run_dir / "runs/t/train/export/mergedistill.json").read_text())["best_checkpoint"]
    assert best["metric"] == "val/loss" and best["score"] == pytest.approx(min(v for _, v in val), rel=1e-5)
    files = sorted(p.name for p in (run_dir / "runs/t/train/checkpoints").glob("best-*.ckpt"))
    assert files == [Path(best["file"]).name]
    # the file holds the weights of the step whose validation it was judged on
    ckpt = torch.load(run_dir / "runs/t/train" / best["file"], map_location="cpu", weights_only=False)
    step_of_min = [s for s, v in val if v == min(v for _, v in val)][0]
    assert ckpt["global_step"] in (step_of_min, step_of_min + 1)  # Lightning logs validation at step - 1
    assert f"best-step={ckpt['global_step']}" in files[0]


# ---- a usable student -------------------------------------------------------------------------------
def test_export_restricts_each_language_to_the_ids_its_tokenizer_writes(run_dir, tiny_teachers, corpora):
    from mergedistill.models.exported import load_student
    from mergedistill.vocab.stage import load_vocab

    cfg = write_config(run_dir, tiny_teachers, corpora, max_steps=4, val_every=2)
    assert main(["train", "--config", str(cfg)]) == 0
    export = run_dir / "runs/t/train/export"
    vocab, _ = load_vocab(load_config(cfg))
    for lang, teacher in ROUTING.items():
        ids = np.load(export / "token_ids" / f"{lang}.npy")
        assert (ids == vocab.producible_ids(teacher)).all() and 5 < len(ids) < vocab.size
        assert not set(ids.tolist()) & {0, 1, 2, 3, 4}
    de = load_student(export, "de")
    preds = de.fill_mask(f"Die Schüler lernen {de.tokenizer.mask_token} Wörter in der Schule.", top_k=8)
    allowed = set(np.load(export / "token_ids" / "de.npy").tolist())
    assert len(preds) == 1 and len(preds[0]) == 8
    assert all(p["token"] in allowed and p["token_str"] and "unused" not in p["token_str"] for p in preds[0])
    assert sum(p["score"] for p in preds[0]) <= 1.0 + 1e-6
    # unrestricted, the student's top predictions include ids German cannot write (the point of restricting)
    with torch.no_grad():
        inputs = de.tokenizer(f"Die Schüler lernen {de.tokenizer.mask_token} Wörter.", return_tensors="pt")
        at = (inputs["input_ids"][0] == de.tokenizer.mask_token_id).nonzero()[0, 0]
        top = de.model(**inputs).logits[0, at].topk(50).indices.tolist()
    assert set(top) - allowed


def test_model_card_example_runs_and_prints_words_of_each_language(run_dir, tiny_teachers, corpora):
    import re

    cfg = write_config(run_dir, tiny_teachers, corpora, max_steps=4, val_every=2)
    assert main(["train", "--config", str(cfg)]) == 0
    export = run_dir / "runs/t/train/export"
    card = (export / "README.md").read_text(encoding="utf-8")
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    for lang in ROUTING:  # a real sentence of each language
        m = re.search(rf"^    '{lang}': (['\"])(.*)\1,  # (\S+)$", code, re.M)
        assert m, lang
        word = m.group(3)
        sentence = m.group(2).replace("[MASK]", word).replace("<mask>", word)
        assert any(sentence == line.strip() or sentence.replace(word, " " + word, 1) == line.strip()
                   for line in (corpora[lang].read_text(encoding="utf-8").splitlines())), (lang, sentence)
    out = subprocess.run([sys.executable, "-c", code], cwd=export, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    printed = {line.split(" | ")[0]: line for line in out.stdout.splitlines()}
    assert set(printed) == set(ROUTING)
    for lang, line in printed.items():
        words = eval(line.rsplit(" -> ", 1)[1])  # noqa: S307 -- the list the card's code printed
        # real tokens of the language (a token that decodes to nothing, e.g. a lone `Ġ`, is shown as itself)
        assert len(words) == 5 and all(w and "unused" not in w and w not in ("[PAD]", "[CLS]", "[SEP]", "<s>", "</s>") for w in words)
    # the card travels with the folder: no local paths, no Python dict reprs, no links out of it
    assert str(run_dir) not in card and "/tmp" not in card and "{'" not in card and "](" not in card


def test_language_softmax_trains_each_position_among_its_languages_ids(run_dir, tiny_teachers, corpora):
    """train.softmax language: the step's logits span the largest language's ids only (not the joint
    vocabulary), the loss falls, online mode and the MLM-only baseline take the same path, and the export is
    used through its language's ids as before."""
    from mergedistill.models.exported import load_student
    from mergedistill.train.stage import ShardDataModule, make_module
    from mergedistill.data.stage import load_manifest
    from mergedistill.tokens import UNK_ID
    from mergedistill.vocab.stage import load_vocab

    cfg_path = write_config(run_dir, tiny_teachers, corpora, max_steps=60, softmax="language")
    cfg = load_config(cfg_path)
    vocab, vrec = load_vocab(cfg)
    languages = list(ROUTING)
    module, _ = make_module(cfg, vocab, languages)
    manifest = load_manifest(cfg, vrec["vocab"])
    sources = ShardDataModule(cfg, manifest, vrec["vocab"], languages)._sources("train")
    batch = SampledBatches(sources, sampling_probs({lang: 1 for lang in languages}, 0.0), 16, 0, 1, 0, manifest["k"]).batch(0)
    logits, parts = module.losses(batch)
    widest = max(len(vocab.producible_ids(t)) for t in set(ROUTING.values())) + 1  # and the unknown token
    assert logits.shape == (len(batch.labels), widest) and widest < vocab.size
    for li, lang in enumerate(languages):  # every prediction is one of its language's ids
        here = batch.lang == li
        assert set(parts["top1"][here].tolist()) <= set(vocab.producible_ids(ROUTING[lang]).tolist()) | {UNK_ID}

    assert main(["train", "--config", str(cfg_path)]) == 0
    loss = [v for _, v in series(metrics(run_dir), "train/loss")]
    assert np.mean(loss[-2:]) < np.mean(loss[:2]) - 0.3
    de = load_student(run_dir / "runs/t/train/export", "de")
    preds = de.fill_mask(f"Die Schüler lernen {de.tokenizer.mask_token} Wörter in der Schule.", top_k=3)
    assert len(preds[0]) == 3
    assert main(["train", "--config", str(cfg_path), "--baseline"]) == 0
    online = write_config(run_dir, tiny_teachers, corpora, max_steps=4, val_every=2, softmax="language", mode="online")
    assert main(["train", "--config", str(online), "--force"]) == 0
