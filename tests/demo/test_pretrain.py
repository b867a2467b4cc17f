import csv
import json
import logging
import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

from conftest import patterned_texts, tiny_model, tiny_tokenizer
from mergedistill.data.masking import MLMCollator
from mergedistill.data.packing import SpecialLayout, pack_texts
from mergedistill.demo.pretrain import (
    Documents,
    PhasedBatches,
    PretrainConfig,
    group_sample_weights,
    pack_corpus,
    pretrain,
    sampling_probs,
    tokenize_corpus,
    unigram_log_probs,
)


def test_sampling_probs_and_weights():
    q = sampling_probs([900, 100], alpha=0.3)
    expected = [0.9 ** 0.3 / (0.9 ** 0.3 + 0.1 ** 0.3), 0.1 ** 0.3 / (0.9 ** 0.3 + 0.1 ** 0.3)]
    assert q == pytest.approx(expected)
    assert sampling_probs([900, 100], alpha=1.0) == pytest.approx([0.9, 0.1])
    w = group_sample_weights(torch.tensor([0, 0, 1, 0]), [0.5, 0.5])
    assert w.tolist() == pytest.approx([1 / 6, 1 / 6, 0.5, 1 / 6])


def test_phased_batches_follow_the_curriculum_and_group_probabilities():
    cfg = PretrainConfig(seq_len=64, batch_size=4, max_steps=100, short_seq_lens=[16, 32], short_seq_fraction=0.5)
    assert cfg.phases() == [(16, 16, 25), (32, 8, 25), (64, 4, 50)]
    assert PretrainConfig(seq_len=64, max_steps=10).phases() == [(64, 32, 10)]
    tok = tiny_tokenizer("wordpiece")
    docs = tokenize_corpus(tok, [patterned_texts(300, seed=1), patterned_texts(30, seed=2)])  # 10:1
    layout = SpecialLayout.of(tok)
    packs = {n: pack_corpus(docs, n, layout, tok.pad_token_id) for n in (16, 32, 64)}
    phases = [(packs[n], b, s) for n, b, s in cfg.phases()]
    gen = torch.Generator().manual_seed(0)
    collators = [MLMCollator(p, tok, 0.15, generator=gen) for p, _, _ in phases]
    for group_probs in (None, [0.5, 0.5]):
        batches = list(PhasedBatches(phases, collators, group_probs, gen))
        assert len(batches) == 100
        assert [b["input_ids"].shape for b in (batches[0], batches[25], batches[99])] == [(16, 16), (8, 32), (4, 64)]
    p64 = packs[64]
    assert (p64.groups == 1).float().mean().item() < 0.15  # the small group's natural share
    sampler = PhasedBatches(phases, collators, None, torch.Generator().manual_seed(1))
    epoch = torch.cat(list(sampler._indices(p64, 4, len(p64) // 4)))
    assert len(set(epoch.tolist())) == len(epoch)  # without probabilities: an epoch repeats no sequence
    sampler = PhasedBatches(phases, collators, [0.5, 0.5], torch.Generator().manual_seed(1))
    drawn = torch.cat(list(sampler._indices(p64, 4, 1000)))
    assert abs((p64.groups[drawn] == 1).float().mean().item() - 0.5) < 0.03  # with them: half and half


def test_unigram_log_probs_and_output_bias_init(tmp_path):
    docs = Documents(ids=[[5, 5, 6], [7]], groups=[0, 1])
    lp = unigram_log_probs(docs, vocab_size=10)
    assert lp[5].item() == pytest.approx(math.log(3 / 14)) and lp[0].item() == pytest.approx(math.log(1 / 14))
    mixed = unigram_log_probs(docs, vocab_size=10, group_probs=[0.5, 0.5])  # group 1's one token counts as half the mass
    assert mixed[7].item() == pytest.approx(math.log((0.5 * 4 + 1) / 14))
    tok = tiny_tokenizer("wordpiece")
    model = tiny_model("wordpiece", max_position=32)
    train = tokenize_corpus(tok, [patterned_texts(50)])
    cfg = PretrainConfig(seq_len=32, batch_size=4, max_steps=1, lr=1e-9, warmup_steps=0, init_output_bias=True,
                         num_threads=1, accelerator="cpu")
    pretrain(model, tok, train, None, cfg, tmp_path / "m")
    expected = unigram_log_probs(train, len(tok))
    torch.testing.assert_close(model.get_output_embeddings().bias.detach().double(), expected, atol=1e-4, rtol=0)


def test_pretrain_lowers_loss_and_saves_a_loadable_folder(tmp_path, caplog):
    tok = tiny_tokenizer("byte-bpe")
    model = tiny_model("byte-bpe", max_position=32)
    train = tokenize_corpus(tok, [patterned_texts(400, seed=1)])
    valid = tokenize_corpus(tok, [patterned_texts(60, seed=2)])
    cfg = PretrainConfig(seq_len=32, batch_size=16, max_steps=60, lr=3e-3, warmup_steps=5, eval_every=30,
                         eval_sequences=64, log_every=20, num_threads=1, accelerator="cpu",
                         short_seq_lens=[16], short_seq_fraction=0.25)
    out = tmp_path / "mlm"
    valid_packed = pack_texts(tok, patterned_texts(60, seed=2), seq_len=32)
    probe = MLMCollator(valid_packed, tok, 0.15, seed=9)(list(range(len(valid_packed))))
    with torch.no_grad():
        initial = float(model(**probe).loss)
    with caplog.at_level(logging.INFO, logger="mergedistill.demo.pretrain"):
        result = pretrain(model, tok, train, valid, cfg, out, name="tiny", meta={"note": "test"})
    assert result.steps == 60
    assert any("step 20/60" in r.message and "tokens/s" in r.message and "ETA" in r.message for r in caplog.records)

    meta = json.loads((out / "pretrain.json").read_text())
    history = meta["history"]
    assert [h["step"] for h in history] == [30, 60] and meta["note"] == "test"
    assert [(p["seq_len"], p["steps"]) for p in meta["phases"]] == [(16, 15), (32, 45)]
    with open(out / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) >= 2 and losses[-1] < losses[0] - 0.5  # it learned
    assert history[-1]["val_loss"] < initial - 1.0
    assert not list(tmp_path.glob(".mlm*"))  # the temp folder was renamed into place

    loaded = AutoModelForMaskedLM.from_pretrained(out).eval()
    loaded_tok = AutoTokenizer.from_pretrained(out)
    assert (out / "model.safetensors").is_file()
    text = "the cat sleeps near the mat"
    enc, enc2 = tok(text, return_tensors="pt"), loaded_tok(text, return_tensors="pt")
    assert torch.equal(enc["input_ids"], enc2["input_ids"])
    assert loaded_tok.mask_token_id == tok.mask_token_id
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**enc2).logits, model(**enc).logits, rtol=0, atol=0)


def test_pretrain_reports_config_problems(tmp_path):
    tok = tiny_tokenizer("wordpiece")
    train = tokenize_corpus(tok, [patterned_texts(10)])
    with pytest.raises(ValueError) as e:
        pretrain(tiny_model("wordpiece", 16), tok, train, None,
                 PretrainConfig(seq_len=32, mask_prob=1.5, warmup_steps=-1, short_seq_lens=[64]), tmp_path / "x",
                 group_probs=[0.5, 0.5])
    msg = str(e.value)
    assert "mask_prob" in msg and "warmup_steps" in msg and "short_seq_lens" in msg and "group_probs" in msg
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------------
# teachers_build: config checks, a tiny end-to-end build, idempotence


def _tiny_teachers_config(tmp_path):
    from mergedistill.demo.teachers_build import load_teachers_config

    corpora = tmp_path / "corpora"
    for lang, seed in (("de", 1), ("ja", 2)):
        (corpora / lang).mkdir(parents=True)
        texts = patterned_texts(120, seed=seed)
        if lang == "ja":
            texts = [t.replace(" ", "") for t in texts]
        (corpora / lang / "train.txt").write_text("\n".join(texts[:100]) + "\n")
        (corpora / lang / "valid.txt").write_text("\n".join(texts[100:]) + "\n")
    cfg_path = tmp_path / "teachers.yaml"
    cfg_path.write_text(f"""
corpora: {corpora}
defaults:
  vocab_size: 400
  hidden: 32
  layers: 1
  heads: 2
  intermediate: 64
  train: {{seq_len: 32, batch_size: 8, max_steps: 6, eval_every: 3, eval_sequences: 8, log_every: 3,
           short_seq_lens: [16], short_seq_fraction: 0.5, num_threads: 1, accelerator: cpu, init_output_bias: true}}
teachers:
  de: {{languages: [de], tokenizer: wordpiece}}
  multi: {{languages: [de, ja], tokenizer: sp-bpe}}
eval: {{pll_lines: 5, acc_sequences: 8}}
""")
    return load_teachers_config(str(cfg_path)), cfg_path


def test_teachers_config_reports_every_problem_at_once(tmp_path):
    from mergedistill.demo.teachers_build import load_teachers_config
    from mergedistill.errors import ConfigError

    cfg_path = tmp_path / "t.yaml"
    cfg_path.write_text("""
corpora: nowhere
defaults: {hidden: 30, heads: 4, layrs: 2}
teachers:
  de: {languages: [de], tokenizer: wordpeice}
  ru: {languages: [ru], tokenizer: byte-bpe}
""")
    with pytest.raises(ConfigError) as e:
        load_teachers_config(str(cfg_path))
    msg = e.value.render()
    assert "defaults.layrs: unknown key; did you mean 'layers'?" in msg
    assert msg.count("layrs") == 1  # reported once, under defaults, not once per teacher
    assert "teachers.de.tokenizer" in msg and "did you mean 'wordpiece'" in msg
    assert "teachers.ru.hidden: 30 must be a multiple of heads (4)" in msg
    assert "nowhere/ru/train.txt" in msg


def test_teachers_build_end_to_end_and_idempotent(tmp_path, caplog):
    from transformers import AutoModelForMaskedLM

    from mergedistill.demo.teachers_build import build

    cfg, _ = _tiny_teachers_config(tmp_path)
    out = tmp_path / "teachers"
    with caplog.at_level(logging.INFO):
        build(cfg, out)
    for name, cls in (("de", "BertForMaskedLM"), ("multi", "XLMRobertaForMaskedLM")):
        model = AutoModelForMaskedLM.from_pretrained(out / name)
        assert type(model).__name__ == cls
        assert AutoTokenizer.from_pretrained(out / name).mask_token_id is not None
    evaluation = json.loads((out / "multi" / "eval.json").read_text())
    assert set(evaluation["languages"]) == {"de", "ja"}
    assert evaluation["languages"]["ja"]["unit"] == "char" and evaluation["languages"]["de"]["unit"] == "word"
    meta = json.loads((out / "multi" / "pretrain.json").read_text())
    assert sum(v["sampling_prob"] for v in meta["languages"].values()) == pytest.approx(1.0)
    with open(out / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["teacher"], r["language"]) for r in rows] == [("de", "de"), ("multi", "de"), ("multi", "ja")]
    report = (out / "report.md").read_text()
    assert "| multi | ja | sp-bpe |" in report and "fixed random subset of 5 lines per language" in report

    stamp = (out / "de" / "model.safetensors").stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO):
        build(cfg, out)
    assert (out / "de" / "model.safetensors").stat().st_mtime_ns == stamp  # not retrained
    assert sum("complete, skipped" in r.message for r in caplog.records) == 2


def test_teachers_train_two_at_a_time_in_worker_processes(tmp_path, caplog):
    """--jobs 2: the teachers train side by side, each in a process of its own with cores // 2 threads;
    the folders are the same standard ones, with the configured settings' fingerprint (a rerun skips them)."""
    from transformers import AutoModelForMaskedLM

    from mergedistill.demo.pretrain import available_cores
    from mergedistill.demo.teachers_build import build, is_trained, load_teachers_config, train_fingerprint

    if available_cores() < 2:
        pytest.skip("one core: teachers train one after the other whatever --jobs says")
    _, cfg_path = _tiny_teachers_config(tmp_path)
    cfg_path.write_text(cfg_path.read_text().replace(" num_threads: 1,", ""))  # the worker picks the threads
    cfg = load_teachers_config(str(cfg_path))
    assert cfg.teachers["de"].train.num_threads is None
    out = tmp_path / "teachers"
    with caplog.at_level(logging.INFO):
        build(cfg, out, jobs=2)
    assert any("multi, de: 2 at a time" in r.message for r in caplog.records)  # the most steps x languages first
    for name in ("de", "multi"):
        assert AutoModelForMaskedLM.from_pretrained(out / name) is not None
        assert is_trained(out / name, train_fingerprint(name, cfg.teachers[name], cfg.corpora))
        meta = json.loads((out / name / "pretrain.json").read_text())
        assert meta["teacher"]["train"]["num_threads"] == max(1, available_cores() // 2)
        assert (out / name / "eval.json").is_file()
    each = max(1, available_cores() // 2)
    assert f"de, multi trained side by side ({each} thread(s) each): their times overlap" in (out / "report.md").read_text()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        build(cfg, out, jobs=1)
    assert sum("complete, skipped" in r.message for r in caplog.records) == 2


def test_a_failing_teacher_stops_the_workers_and_keeps_the_finished_ones(tmp_path):
    from mergedistill.demo.teachers_build import build, is_trained, train_fingerprint

    cfg, _ = _tiny_teachers_config(tmp_path)
    (tmp_path / "corpora" / "ja" / "train.txt").write_text("\n")  # emptied after the config was checked
    cfg.teachers["multi"].languages = ["ja"]
    with pytest.raises(ValueError, match="positive sum"):  # multi's worker: no text to build a tokenizer from
        build(cfg, tmp_path / "teachers", jobs=2)
    assert is_trained(tmp_path / "teachers" / "de", train_fingerprint("de", cfg.teachers["de"], cfg.corpora))
    assert not (tmp_path / "teachers" / "multi").exists() and not (tmp_path / "teachers" / "report.md").exists()


def test_jobs_below_one_is_refused(tmp_path, capsys):
    from mergedistill.demo.teachers_build import main

    _, cfg_path = _tiny_teachers_config(tmp_path)
    assert main(["--config", str(cfg_path), "--out", str(tmp_path / "t"), "--jobs", "0"]) == 2
    assert "--jobs 0: need at least 1" in capsys.readouterr().err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers die with the build through Linux's PR_SET_PDEATHSIG")
def test_killing_the_build_kills_its_training_workers(tmp_path):
    """kill -9 of teachers_build during a two-at-a-time training: its workers go too, no teacher is left
    half-built looking complete, and a rerun starts them again."""
    import signal
    import subprocess
    import time

    from mergedistill.demo.pretrain import available_cores
    from mergedistill.demo.teachers_build import is_trained, train_fingerprint

    if available_cores() < 2:
        pytest.skip("one core: no workers")
    cfg, cfg_path = _tiny_teachers_config(tmp_path)
    out = tmp_path / "teachers"
    proc = subprocess.Popen([sys.executable, "-m", "mergedistill.demo.teachers_build", "--config", str(cfg_path), "--out",
                             str(out), "-j", "2", "--defaults.train.max_steps=1000000"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def children() -> set[int]:
        try:
            return {int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()}
        except FileNotFoundError:
            return set()

    deadline = time.monotonic() + 120
    started: list[str] = []
    while len(started) < 2 and time.monotonic() < deadline:  # both workers are training
        line = proc.stdout.readline()
        if "training (not built yet)" in line:
            started.append(line)
    assert len(started) == 2, "the workers did not start"
    workers = children()
    assert len(workers) >= 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    alive = workers
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = {p for p in alive if Path(f"/proc/{p}").exists() and "zombie" not in Path(f"/proc/{p}/status").read_text()}
    assert not alive, f"workers {sorted(alive)} outlived the build"
    for name in ("de", "multi"):
        assert not is_trained(out / name, train_fingerprint(name, cfg.teachers[name], cfg.corpora))


def test_a_teacher_rebuilt_alone_is_the_one_trained_beside_the_others(tmp_path):
    """Threads change the last bits of a trained model (torch's CPU kernels sum in another order), so they come
    from -j and the cores, not from how many teachers are left: `--only de` with -j 2 trains de on the thread
    count it had beside multi, and gives the same bytes (before: all the cores, other bytes)."""
    import hashlib

    from mergedistill.demo.pretrain import available_cores
    from mergedistill.demo.teachers_build import load_teachers_config, train_fingerprint, train_teachers

    if available_cores() < 2:
        pytest.skip("one core: one thread whatever -j says")
    _, cfg_path = _tiny_teachers_config(tmp_path)
    cfg_path.write_text(cfg_path.read_text().replace(" num_threads: 1,", ""))  # threads from -j, as in the demo
    cfg = load_teachers_config(str(cfg_path))
    todo = [(n, "test", train_fingerprint(n, cfg.teachers[n], cfg.corpora)) for n in ("de", "multi")]
    train_teachers(todo, cfg, tmp_path / "both", jobs=2)  # side by side, in worker processes
    train_teachers(todo[:1], cfg, tmp_path / "alone", jobs=2)  # de alone, in this process
    for name in ("model.safetensors", "tokenizer.json"):
        a, b = ((tmp_path / run / "de" / name).read_bytes() for run in ("both", "alone"))
        assert hashlib.sha256(a).digest() == hashlib.sha256(b).digest(), f"de/{name} differs when trained alone"
    assert json.loads((tmp_path / "alone" / "de" / "pretrain.json").read_text())["teacher"]["train"]["num_threads"] == \
        available_cores() // 2
    assert torch.get_num_threads() == available_cores()  # back to every core for what follows (evaluation)
