"""`mergedistill compress` end to end on tiny fixtures: vocab, data and a 30-step student built here, then
every kind of variant (one-shot and recovered pruning, structured, int8, a smaller student), evaluated as
`evaluate` evaluates, measured, reported; reloading, reruns and bad input."""
from __future__ import annotations

import csv
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForMaskedLM

from conftest import SENTENCES, in_dir, make_config
from mergedistill.cli import main
from mergedistill.compress.export import load_variant
from mergedistill.compress.magnitude import prunable_weights, prune_magnitude, sparsity_of
from mergedistill.compress.quantize import Int8Linear
from mergedistill.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")

ROUTING = {"en": "wp", "de": "wp", "ru": "uni", "fr": "bbpe"}
DATA = {"seq_len": 32, "shard_lines": 20, "splits": ["train", "valid"], "batch_size": 8}
STUDENT = {"hidden": 32, "heads": 2, "layers": 2, "intermediate": 64, "max_position": 64}
TRAIN = {"max_steps": 30, "val_every": 10, "batch_size": 8, "lr": 0.003, "warmup_steps": 3}
EVAL = {"max_lines": 24, "pll_lines": 3, "batch_size": 8, "retrieval": False, "baseline": False, "mask_prob": 0.3}
COMPRESS = {"sparsity": [0.5], "recovery_steps": 12, "recovery_lr": 0.003, "prune_frequency": 2, "heads": [0.5],
            "neurons": [0.5], "layers": [1], "importance_batches": 2, "small_layers": 1, "small_steps": 12,
            "throughput_batches": 1, "throughput_batch_size": 4, "throughput_repeats": 2}
VARIANTS = ["sparse-50", "sparse-50-rec", "heads-50", "heads-50-rec", "ffn-50", "ffn-50-rec", "drop-1", "drop-1-rec", "int8", "small"]


def write_corpora(root: Path) -> dict[str, Path]:
    out = {}
    for lang in ROUTING:
        sents = SENTENCES[lang]
        lines = [f"{s} {' '.join(sents[(i + 1) % len(sents)].split()[: i % 4])}".strip() for i, s in enumerate(sents * 10)]
        (root / f"{lang}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (root / f"{lang}.valid.txt").write_text("\n".join(lines[:12]) + "\n", encoding="utf-8")
        (root / f"{lang}.test.txt").write_text("\n".join(lines[5:25]) + "\n", encoding="utf-8")
        out[lang] = root / f"{lang}.txt"
    return out


def write_config(work: Path, teachers, corpora, **compress) -> Path:
    path = make_config(work / "c.yaml", teachers, corpora, ROUTING, data=DATA, student=STUDENT, train=TRAIN, eval=EVAL,
                       compress={**COMPRESS, **compress})
    cfg = yaml.safe_load(path.read_text())
    for lang in ROUTING:
        cfg["languages"][lang]["valid"] = str(corpora[lang]).replace(".txt", ".valid.txt")
        cfg["languages"][lang]["test"] = str(corpora[lang]).replace(".txt", ".test.txt")
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, tiny_teachers):
    """vocab, data, a trained student, then `mergedistill compress` once; yields (work dir, config path)."""
    work = tmp_path_factory.mktemp("compress")
    with in_dir(work):
        cfg = write_config(work, tiny_teachers, write_corpora(work))
        for stage in ("vocab", "data", "train", "compress"):
            assert main([stage, "--config", str(cfg)]) == 0, stage
        yield work, cfg


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_every_variant_is_scored_per_language_and_reported(compressed):
    work, _ = compressed
    out = work / "runs/t/compress"
    results = read_csv(out / "results.csv")
    got = {(r["model"], r["language"], r["metric"]) for r in results}
    for name in ["student", *VARIANTS]:
        for lang in ROUTING:
            for metric in ("mlm_acc", "agreement", "pll_per_word", "pppl"):
                assert (name, lang, metric) in got, (name, lang, metric)
    for lang, teacher in ROUTING.items():
        assert (f"teacher:{teacher}", lang, "mlm_acc") in got
    drops = read_csv(out / "drops.csv")
    assert {(d["variant"], d["language"], d["metric"]) for d in drops} == {(v, lang, m) for v in VARIANTS for lang in ROUTING
                                                                           for m in ("mlm_acc", "agreement", "pll")}
    value = {(r["model"], r["language"], r["metric"]): float(r["value"]) for r in results}
    for d in drops:  # the drop is the relative change against the student, positive = worse
        if d["metric"] == "mlm_acc" and value[("student", d["language"], "mlm_acc")] > 0:
            ref, v = value[("student", d["language"], "mlm_acc")], value[(d["variant"], d["language"], "mlm_acc")]
            # results.csv holds 6 significant digits (drops.csv was computed before that rounding): a relative
            # error of 5e-6 in ref and in v, which a tiny ref magnifies (a drop of -8.0 came back as -8.0000177)
            assert float(d["drop"]) == pytest.approx((ref - v) / ref, abs=1e-5 * (1 + abs(v / ref)))
    report = (out / "report.md").read_text()
    for name in VARIANTS:
        assert f"| {name} |" in report
    assert "## Findings" in report and "pays most" in report and "Spearman" in report and "Mild sparsity" in report
    plots = sorted(p.name for p in (out / "plots").iterdir())
    assert "drop_mlm_acc.png" in plots and "sparsity_mlm_acc.png" in plots and "sparsity_mlm_acc_rec.png" in plots
    assert "size_mlm_acc.png" in plots
    assert all(f"plots/{p}" in report for p in plots)


def test_costs_are_measured_side_by_side(compressed):
    work, _ = compressed
    costs = {r["variant"]: r for r in read_csv(work / "runs/t/compress/variants.csv")}
    assert list(costs)[0] == "student" and set(costs) == {"student", *VARIANTS}
    w = {k: int(v["weights"]) for k, v in costs.items()}
    nz = {k: int(v["nonzero"]) for k, v in costs.items()}
    assert w["sparse-50"] == w["student"] and nz["sparse-50"] < w["student"]  # zeros, not removed weights
    assert nz["sparse-50-rec"] == nz["sparse-50"]  # the same count of encoder weights zeroed
    for name in ("heads-50", "ffn-50", "drop-1", "small"):
        assert w[name] < w["student"], name  # genuinely smaller models
    assert w["int8"] == w["student"] and int(costs["int8"]["weights_bytes"]) < 0.5 * int(costs["student"]["weights_bytes"])
    assert float(costs["student"]["speed_ratio"]) == 1.0 and all(float(c["tokens_per_s"]) > 0 for c in costs.values())
    assert costs["heads-50"]["loader"] == "load_pruned" and costs["int8"]["loader"] == "load_quantized"
    assert costs["sparse-50"]["loader"] == costs["drop-1"]["loader"] == "from_pretrained"


def test_recovery_lowers_the_loss(compressed):
    """The recovered twin of each pruned variant has a lower held-out loss than the one-shot one, and its
    training loss went down."""
    work, _ = compressed
    costs = {r["variant"]: float(r["heldout_loss"]) for r in read_csv(work / "runs/t/compress/variants.csv")}
    for name in ("sparse-50", "drop-1", "ffn-50"):
        assert costs[f"{name}-rec"] < costs[name], (name, costs[name], costs[f"{name}-rec"])
    built = json.loads((work / "runs/t/compress/drop-1-rec/mergedistill.json").read_text())["compress"]["built"]
    assert built["recovery"]["steps"] == 12 and built["recovery"]["train_loss_end"] < built["recovery"]["train_loss_start"]


def test_variants_reload_as_documented(compressed):
    work, cfg_path = compressed
    out = work / "runs/t/compress"
    student = AutoModelForMaskedLM.from_pretrained(str(work / "runs/t/train/export")).eval()
    ids = torch.randint(5, student.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # one-shot pruning: a standard folder holding exactly the pruned weights (masks made permanent)
        sparse = AutoModelForMaskedLM.from_pretrained(str(out / "sparse-50")).eval()
        expected = AutoModelForMaskedLM.from_pretrained(str(work / "runs/t/train/export")).eval()
        prune_magnitude(expected, 0.5)
        assert torch.equal(sparse(input_ids=ids).logits, expected(input_ids=ids).logits)
        assert not torch.equal(sparse(input_ids=ids).logits, student(input_ids=ids).logits)
        assert sparsity_of(prunable_weights(sparse)) == pytest.approx(0.5, abs=1e-3)
        assert sparsity_of(prunable_weights(AutoModelForMaskedLM.from_pretrained(str(out / "sparse-50-rec")))) == pytest.approx(0.5, abs=1e-3)
        # structured: smaller configs; head-pruned folders need load_pruned (plain from_pretrained refuses them)
        assert AutoModelForMaskedLM.from_pretrained(str(out / "ffn-50")).config.intermediate_size == 32
        assert AutoModelForMaskedLM.from_pretrained(str(out / "drop-1")).config.num_hidden_layers == 1
        assert AutoModelForMaskedLM.from_pretrained(str(out / "small")).config.num_hidden_layers == 1
        heads = load_variant(out / "heads-50")
        assert sum(layer.attention.self.num_attention_heads for layer in heads.bert.encoder.layer) == 2
        removed = json.loads((out / "heads-50" / "mergedistill.json").read_text())["compress"]["built"]["removed"]["heads"]
        assert {int(k): v for k, v in removed.items()} == {int(k): v for k, v in heads.config.pruned_heads.items()}
        with pytest.raises(Exception, match="size mismatch|ignore_mismatched_sizes"):  # refused, never loaded wrongly
            AutoModelForMaskedLM.from_pretrained(str(out / "heads-50"))
        q = load_variant(out / "int8")
        assert any(isinstance(m, Int8Linear) for m in q.modules())
        assert (q(input_ids=ids).logits - student(input_ids=ids).logits).abs().max() < 0.1 * student(input_ids=ids).logits.abs().max()
    for name in VARIANTS:  # each folder carries the student's tokenizers and languages, and says how to load it
        folder = out / name
        assert json.loads((folder / "languages.json").read_text()) == {lang: f"tokenizers/{t}" for lang, t in ROUTING.items()}
        assert (folder / "tokenizers" / "wp" / "tokenizer.json").is_file() or (folder / "tokenizers" / "wp" / "vocab.txt").is_file()
        rec = json.loads((folder / "mergedistill.json").read_text())
        assert rec["compress"]["variant"] == name and rec["vocab"]
        assert rec["compress"]["loader"] in (folder / "README.md").read_text()


def test_student_scores_equal_evaluate(compressed, tmp_path):
    """The uncompressed student's rows are what `mergedistill evaluate` reports for it (same code, settings)."""
    work, cfg_path = compressed
    with in_dir(work):
        assert main(["evaluate", "--config", str(cfg_path)]) == 0
    ev = {(r["language"], r["metric"]): r["value"] for r in read_csv(work / "runs/t/eval/results.csv") if r["model"] == "student"}
    co = {(r["language"], r["metric"]): r["value"] for r in read_csv(work / "runs/t/compress/results.csv") if r["model"] == "student"}
    assert ev and co == ev


def test_rerun_skips_and_a_new_level_builds_only_its_variants(compressed, caplog):
    from mergedistill.compress.stage import run_compress

    work, cfg_path = compressed
    out = work / "runs/t/compress"
    stamp = {n: os.stat(out / n / "mergedistill.json").st_mtime_ns for n in VARIANTS}
    report = os.stat(out / "report.md").st_mtime_ns
    with in_dir(work):
        cfg = load_config(cfg_path)
        with caplog.at_level("INFO"):
            run_compress(cfg)
        assert "is complete for these inputs; skipping" in caplog.text
        assert os.stat(out / "report.md").st_mtime_ns == report
        caplog.clear()
        more = replace(cfg, compress=replace(cfg.compress, sparsity=[0.5, 0.25], quantize=False))
        with caplog.at_level("INFO"):
            run_compress(more)
    assert {n: os.stat(out / n / "mergedistill.json").st_mtime_ns for n in VARIANTS} == stamp  # kept, not rebuilt
    assert (out / "sparse-25" / "config.json").is_file() and (out / "sparse-25-rec" / "config.json").is_file()
    assert "evaluating sparse-25, sparse-25-rec per language" in caplog.text  # the others' scores come from the cache
    assert "int8 not in this config's variants: left as they are" in caplog.text
    costs = [r["variant"] for r in read_csv(out / "variants.csv")]
    assert "sparse-25" in costs and "int8" not in costs
    assert cfg.compress.sparsity == [0.5]  # the config given was not changed


@pytest.mark.parametrize("override, message", [
    ("--compress.sparsity=[1.2, 0.5]", "compress.sparsity[0]: 1.2 is out of range; allowed: in [0, 1)"),
    ("--compress.sparsity=[-0.1]", "compress.sparsity[0]: -0.1 is out of range; allowed: in [0, 1)"),
    ("--compress.layers=[0]", "compress.layers[0]: 0 is out of range; allowed: >= 1"),
])
def test_bad_settings_exit_2_before_anything_runs(tmp_path, tiny_teachers, override, message, capsys):
    corpora = write_corpora(tmp_path)
    cfg = write_config(tmp_path, tiny_teachers, corpora)
    with in_dir(tmp_path):
        assert main(["compress", "--config", str(cfg), override, "--compress.neurons=[1.0]"]) == 2
    err = capsys.readouterr().err
    assert message in err and "compress.neurons[0]: 1 is out of range; allowed: in [0, 1)" in err  # every problem at once
    assert not (tmp_path / "runs").exists()


def test_pruning_more_heads_or_layers_than_the_student_has_exits_2(compressed, capsys):
    """Checked against the exported student (2 layers x 2 heads), all problems at once, nothing built."""
    work, cfg = compressed
    before = sorted(p.name for p in (work / "runs/t/compress").iterdir())
    with in_dir(work):
        assert main(["compress", "--config", str(cfg), "--compress.heads=[0.9, 0.5]", "--compress.layers=[2]"]) == 2
    err = capsys.readouterr().err
    assert "compress.heads[0]: 0.9 of the student's 4 heads is 4, but every layer keeps one head: at most 2 can go" in err
    assert "compress.layers[0]: cannot drop 2 of the student's 2 layers" in err and "compress.heads[1]" not in err
    assert sorted(p.name for p in (work / "runs/t/compress").iterdir()) == before


def test_defaults_never_make_another_stage_refuse_a_small_student(tmp_path, tiny_teachers):
    """A 1-layer, 1-head student cannot lose a layer or a head, but only `compress` minds."""
    cfg = make_config(tmp_path / "c.yaml", tiny_teachers, write_corpora(tmp_path), ROUTING,
                      student={"hidden": 32, "heads": 1, "layers": 1, "intermediate": 64})
    assert load_config(cfg).compress.layers == [1]


def test_a_missing_student_exits_2(tmp_path, tiny_teachers, capsys):
    cfg = write_config(tmp_path, tiny_teachers, write_corpora(tmp_path))
    with in_dir(tmp_path):
        assert main(["compress", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "no exported student" in err and "mergedistill train --config" in err
