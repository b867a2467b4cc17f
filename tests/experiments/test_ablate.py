"""`ablate` runs routing variants end to end and reuses what did not change."""
from __future__ import annotations

import copy
import json
import os

import yaml

from conftest import SENTENCES, make_config
from mergedistill.cli import main
from mergedistill.config import load_config
from mergedistill.experiments.ablate import run_ablate


def test_ablate_compares_variants_and_reuses_unchanged_shards(workdir, tiny_teachers, tmp_path):
    corpora = {}
    for lang in ("de", "ru"):
        p = tmp_path / f"{lang}.txt"
        p.write_text("\n".join(SENTENCES[lang] * 6) + "\n", encoding="utf-8")
        corpora[lang] = p
    cfg_path = make_config(
        workdir / "c.yaml", tiny_teachers, corpora, {"de": "wp", "ru": "uni"},
        vocab={"prune": True, "prune_candidates": True},
        data={"seq_len": 32, "shard_lines": 10, "splits": ["train"]},
        student={"hidden": 32, "heads": 2, "layers": 2, "intermediate": 64, "max_position": 64},
        train={"max_steps": 4, "val_every": 4, "batch_size": 4, "warmup_steps": 1},
        eval={"pll_lines": 3},
        ablate={"variants": {"configured": {}, "de-multi": {"de": "multi"}, "same": {"ru": "uni"}}},
    )
    data = yaml.safe_load(cfg_path.read_text())
    for lang in ("de", "ru"):
        data["languages"][lang]["candidates"] = ["multi"]
        data["languages"][lang]["test"] = str(corpora[lang])
    cfg_path.write_text(yaml.safe_dump(data))
    # ablate turns on prune_candidates and trains variants with other routings and steps, all on copies:
    # the config it is given is left as it was
    cfg = load_config(cfg_path, ["--vocab.prune_candidates=false"])
    before = copy.deepcopy(cfg)
    run_ablate(cfg)
    assert cfg == before
    report = (workdir / "runs/t/ablate/report.md").read_text()
    assert "| de | " in report and "(multi)" in report and "(wp)" in report and "geometric mean" in report
    assert (workdir / "runs/t/ablate/ablate.png").stat().st_size > 1000
    rows = (workdir / "runs/t/ablate/results.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 * 2
    # `same` routes as `configured` does: its scores are configured's, and no third student was trained
    same = [r.split(",", 1)[1] for r in rows if r.startswith("same,")]
    assert same and same == [r.split(",", 1)[1] for r in rows if r.startswith("configured,")]
    assert not (workdir / "runs/t-same").exists()
    # the variant shares the run's vocabulary, and ru (same teacher) reuses the run's shards: same files
    assert not (workdir / "vocab/t-de-multi").exists()
    base_ru = sorted((workdir / "runs/t/data/ru/train").glob("*.arrow"))
    var_ru = sorted((workdir / "runs/t-de-multi/data/ru/train").glob("*.arrow"))
    assert base_ru and [os.stat(p).st_ino for p in base_ru] == [os.stat(p).st_ino for p in var_ru]
    base_de = sorted((workdir / "runs/t/data/de/train").glob("*.arrow"))
    var_de = sorted((workdir / "runs/t-de-multi/data/de/train").glob("*.arrow"))
    assert var_de and {os.stat(p).st_ino for p in base_de}.isdisjoint(os.stat(p).st_ino for p in var_de)
    # a second ablation reuses everything: no student is retrained
    stamp = (workdir / "runs/t-de-multi/train/state.json").stat().st_mtime_ns
    assert main(["ablate", "--config", str(cfg_path)]) == 0
    assert (workdir / "runs/t-de-multi/train/state.json").stat().st_mtime_ns == stamp


def test_ablate_refuses_a_variant_the_pruned_vocabulary_cannot_serve(workdir, tiny_teachers, tiny_corpora, capsys):
    cfg_path = make_config(workdir / "c.yaml", tiny_teachers, tiny_corpora, {"de": "wp"}, vocab={"prune": True},
                           data={"seq_len": 32},  # the tiny teachers take 64 tokens (checked before ablate starts)
                           ablate={"variants": {"odd": {"de": "bbpe"}}})
    assert main(["ablate", "--config", str(cfg_path)]) == 2
    err = capsys.readouterr().err
    assert "ablate.variants.odd.de: 'bbpe' is neither the configured teacher nor a candidate" in err
    assert "languages.de: ablate scores students on the test split" in err


def test_ablate_with_other_train_steps_leaves_the_runs_student_alone(workdir, tiny_teachers, tmp_path):
    """ablate.train_steps != train.max_steps: the configured variant trains in runs/<run>-configured on the
    run's shards; the run's own student (runs/<run>/train) is neither retrained nor resumed."""
    corpora = {}
    for lang in ("de",):
        p = tmp_path / f"{lang}.txt"
        p.write_text("\n".join(SENTENCES[lang] * 6) + "\n", encoding="utf-8")
        corpora[lang] = p
    cfg_path = make_config(
        workdir / "c.yaml", tiny_teachers, corpora, {"de": "wp"},
        data={"seq_len": 32, "shard_lines": 10, "splits": ["train"]},
        student={"hidden": 32, "heads": 2, "layers": 2, "intermediate": 64, "max_position": 64},
        train={"max_steps": 6, "val_every": 6, "batch_size": 4, "warmup_steps": 1},
        eval={"pll_lines": 3}, ablate={"variants": {"configured": {}}, "train_steps": 3},
    )
    data = yaml.safe_load(cfg_path.read_text())
    data["languages"]["de"]["test"] = str(corpora["de"])
    cfg_path.write_text(yaml.safe_dump(data))
    for stage in ("vocab", "data", "train"):
        assert main([stage, "--config", str(cfg_path)]) == 0
    state = workdir / "runs/t/train/state.json"
    before = (state.read_text(), state.stat().st_mtime_ns)
    assert main(["ablate", "--config", str(cfg_path)]) == 0
    assert (state.read_text(), state.stat().st_mtime_ns) == before
    variant = json.loads((workdir / "runs/t-configured/train/state.json").read_text())
    assert variant["steps"] == 3 and json.loads(before[0])["steps"] == 6
    base = sorted((workdir / "runs/t/data/de/train").glob("*.arrow"))
    var = sorted((workdir / "runs/t-configured/data/de/train").glob("*.arrow"))
    assert base and [os.stat(p).st_ino for p in base] == [os.stat(p).st_ino for p in var]  # shards shared
