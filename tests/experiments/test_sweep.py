"""`sweep` runs recipe variants end to end, reuses what did not change, and refuses bad --vary options
before any work."""
from __future__ import annotations

import csv
import math
import os
import shutil

import pytest
import yaml

from conftest import SENTENCES, make_config
from mergedistill.cli import main
from mergedistill.config import load_config
from mergedistill.errors import UserError
from mergedistill.experiments.sweep import Axis, Variant, plan_sweep, split_values, student_results, write_outputs

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(
    data={"seq_len": 32, "shard_lines": 10, "splits": ["train"]},
    student={"hidden": 32, "heads": 2, "layers": 2, "intermediate": 64, "max_position": 64},
    train={"max_steps": 3, "val_every": 3, "batch_size": 4, "warmup_steps": 1},
    eval={"pll_lines": 3, "max_lines": 12, "retrieval": False, "baseline": False},
)


def _config(workdir, tiny_teachers, tmp_path, langs=("de", "ru")):
    corpora = {}
    for lang in langs:
        p = tmp_path / f"{lang}.txt"
        p.write_text("\n".join(SENTENCES[lang] * 6) + "\n", encoding="utf-8")
        corpora[lang] = p
    path = make_config(workdir / "c.yaml", tiny_teachers, corpora, {"de": "wp", "ru": "uni"}, **TINY)
    data = yaml.safe_load(path.read_text())
    for lang in langs:
        data["languages"][lang]["test"] = str(corpora[lang])
    path.write_text(yaml.safe_dump(data))
    return path


def _inodes(folder):
    return {str(p.relative_to(folder)): os.stat(p).st_ino for p in sorted(folder.rglob("*.arrow"))}


def test_sweep_of_two_variants_writes_its_table_and_plot_and_reuses_unchanged_shards(workdir, tiny_teachers, tmp_path, caplog):
    cfg_path = _config(workdir, tiny_teachers, tmp_path)
    caplog.set_level("INFO", logger="mergedistill")
    assert main(["sweep", "--config", str(cfg_path), "--vary", "train.temperature=1,2"]) == 0
    # temperature 1 is the configured one: that variant is the run itself; temperature 2 runs beside it
    # on the run's vocabulary and shards: its data stage built nothing, it linked the run's shards
    assert not (workdir / "runs/t-temperature1").exists() and not (workdir / "vocab/t-temperature2").exists()
    base, var = _inodes(workdir / "runs/t/data"), _inodes(workdir / "runs/t-temperature2/data")
    assert len(base) == 5 and base == var  # de: 24 lines, ru: 18, 10 a shard
    assert len(list((workdir / "runs/.shards").iterdir())) == 2  # one input hash per language: nothing new labelled
    assert "data: 5 shards reused from" in caplog.text and "variant 2/2 temperature2" in caplog.text
    state = yaml.safe_load((workdir / "runs/t-temperature2/train/state.json").read_text())
    assert state["inputs"]["train"]["temperature"] == 2.0 and state["steps"] == 3

    out = workdir / "runs/t/sweep/train.temperature"
    rows = {(r["variant"], r["language"]): r for r in csv.DictReader((out / "results.csv").open())}
    assert set(rows) == {(v, lang) for v in ("temperature1", "temperature2") for lang in ("de", "ru")}
    assert rows[("temperature1", "de")]["train.temperature"] == "1" and rows[("temperature2", "de")]["run"] == "t-temperature2"
    # the figures are the variants' own evaluate results, read by metric name (`<m>_lo` / `<m>_hi`: m's interval)
    for variant, run in (("temperature1", "t"), ("temperature2", "t-temperature2")):
        for r in csv.DictReader((workdir / f"runs/{run}/eval/results.csv").open()):
            if r["model"] == "student":
                mine = rows[(variant, r["language"])][r["metric"]]
                assert mine == r["value"] == "" or math.isclose(float(mine), float(r["value"]), rel_tol=1e-5), (variant, r)
    report = (out / "report.md").read_text()
    assert "## mlm_acc per language" in report and "| temperature2 | 2 |" in report and "### ru" in report
    assert "agreement" in report and "runs/t-temperature2" in report
    assert (out / "sweep.png").stat().st_size > 1000

    # a sweep killed during the second variant's evaluation: the rerun trains nothing, evaluates that variant again
    shutil.rmtree(out)
    shutil.rmtree(workdir / "runs/t-temperature2/eval")
    stamps = [(workdir / f"runs/{r}/train/state.json").stat().st_mtime_ns for r in ("t", "t-temperature2")]
    first_eval = (workdir / "runs/t/eval/state.json").stat().st_mtime_ns
    assert main(["sweep", "--config", str(cfg_path), "--vary", "train.temperature=1,2"]) == 0
    assert [(workdir / f"runs/{r}/train/state.json").stat().st_mtime_ns for r in ("t", "t-temperature2")] == stamps
    assert (workdir / "runs/t/eval/state.json").stat().st_mtime_ns == first_eval
    assert (workdir / "runs/t-temperature2/eval/results.csv").is_file() and (out / "report.md").is_file()


def test_bad_vary_options_exit_2_naming_every_problem_before_any_work(workdir, tiny_teachers, tmp_path, capsys):
    cfg_path = _config(workdir, tiny_teachers, tmp_path)
    argv = ["sweep", "--config", str(cfg_path), "--vary", "train.temprature=1,2", "--vary", "train.temperature=0,2",
            "--vary", "data.top_k=x", "--vary", "train.alpha", "--vary", "run=a,b", "--vary", "train.lr=1e-3,1e-3"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "sweep: 6 problem(s); nothing was run" in err
    assert "--vary train.temprature=1,2: train.temprature: unknown key; did you mean 'temperature'?" in err
    assert "--vary train.temperature=0: train.temperature: 0 is out of range; allowed: > 0" in err
    assert "--vary data.top_k=x: data.top_k: expected an integer, got 'x'" in err
    assert "--vary 'train.alpha': needs the form section.key=V1,V2" in err
    assert "--vary run: `run` names the run" in err
    assert "--vary train.lr: 1e-3 given twice" in err
    assert not (workdir / "vocab").exists() and not (workdir / "runs/t/data").exists()
    with pytest.raises(SystemExit) as exit_:  # --vary is required: argparse says so, exit 2
        main(["sweep", "--config", str(cfg_path)])
    assert exit_.value.code == 2 and "required: --vary" in capsys.readouterr().err


def test_combinations_are_checked_as_whole_configs(workdir, tiny_teachers, tmp_path):
    cfg = load_config(_config(workdir, tiny_teachers, tmp_path))
    with pytest.raises(UserError) as e:
        plan_sweep(cfg, ["student.hidden=32,34", "student.heads=2,4"])  # each value is fine with the run's other one
    prefix = "variant hidden34-heads4 (student.hidden=34, student.heads=4): "
    assert prefix + "student.hidden: 34 must be a multiple of student.heads (4)" in e.value.problems
    assert all(p.startswith(prefix) for p in e.value.problems)
    # values that read the same make the same variant; a vocabulary key gets a vocabulary of its own
    with pytest.raises(UserError, match="variants temperature1 and temperature1.0 have the same settings"):
        plan_sweep(cfg, ["train.temperature=1,1.0"])
    cfg.sweep.seeds = [0, 1]
    _, variants = plan_sweep(cfg, ["data.top_k=8,4", "vocab.keep_single_chars=true,false"])
    names = [(v.name, v.cfg.run, v.cfg.vocab_run, v.cfg.train.seed, v.own_vocab) for v in variants]
    assert len(variants) == 8 and names[:3] == [
        ("top_k8-keep_single_charstrue-seed0", "t", None, 0, False),  # the run itself
        ("top_k8-keep_single_charstrue-seed1", "t-top_k8-keep_single_charstrue-seed1", "t", 1, False),  # the run's vocabulary
        ("top_k8-keep_single_charsfalse-seed0", "t-top_k8-keep_single_charsfalse-seed0", None, 0, True)]  # its own
    with pytest.raises(UserError, match="sweep.seeds sets the training seeds already"):
        plan_sweep(cfg, ["train.seed=1,2"])


def test_split_values_keeps_lists_and_quoted_commas_together():
    assert split_values("1, 2") == ["1", "2"]
    assert split_values("[train],[train, valid]") == ["[train]", "[train, valid]"]
    assert split_values("'a,b',c") == ["'a,b'", "c"]


def test_report_reads_metrics_by_name_with_intervals_and_seed_spread(tmp_path, workdir, tiny_teachers):
    """Figures evaluate does not know yet (masked_ce) come through by name; `<metric>_lo/_hi` rows become
    the metric's interval; with several seeds the report gives the mean and standard deviation."""
    cfg = load_config(_config(workdir, tiny_teachers, tmp_path))
    header = "section,language,model,role,metric,value,n\n"
    variants = []
    for seed, (acc, ce) in enumerate([(0.25, 3.0), (0.35, 2.0)]):
        path = tmp_path / f"results{seed}.csv"
        path.write_text(header + "\n".join([
            f"intrinsic,de,student,student,mlm_acc,{acc},40", f"intrinsic,de,student,student,mlm_acc_lo,{acc - 0.1},40",
            f"intrinsic,de,student,student,mlm_acc_hi,{acc + 0.1},40", f"intrinsic,de,student,student,masked_ce,{ce},40",
            "intrinsic,de,teacher:wp,routed teacher,mlm_acc,0.9,40", "intrinsic,de,student,student,pppl,,0"]) + "\n")
        rows = student_results(path)
        assert {r["metric"] for r in rows} == {"mlm_acc", "masked_ce", "pppl"}
        first = next(r for r in rows if r["metric"] == "mlm_acc")
        assert first["interval"] == "evaluate" and math.isclose(first["lo"], acc - 0.1) and math.isclose(first["hi"], acc + 0.1)
        assert math.isnan(next(r for r in rows if r["metric"] == "pppl")["value"])
        variants.append(Variant("alpha0.5", f"alpha0.5-seed{seed}", {"train.alpha": "0.5"}, seed, cfg, rows=rows))
    cfg.sweep.seeds = [0, 1]
    write_outputs(tmp_path, cfg, [Axis("train.alpha", ("0.5",))], variants)
    report = (tmp_path / "report.md").read_text()
    assert "| alpha0.5 | 0.5 | 0.3 ± 0.071 |" in report  # mean of 0.25 and 0.35, sd 0.0707
    assert "| alpha0.5 | 0.3 ± 0.071 | 2.5 ± 0.71 | - |" in report  # every figure: mlm_acc, masked_ce, pppl
    rows = {r["seed"]: r for r in csv.DictReader((tmp_path / "results.csv").open())}
    assert set(rows) == {"0", "1", "mean"} and all(r["language"] == "de" for r in rows.values())
    mean = rows["mean"]
    assert mean["interval"] == "mean -/+ sd over 2 seeds" and math.isclose(float(mean["mlm_acc"]), 0.3)
    assert math.isclose(float(mean["masked_ce_hi"]), 2.5 + math.sqrt(0.5), rel_tol=1e-5) and mean["pppl"] == ""
    one = rows["0"]
    assert (one["mlm_acc_lo"], one["mlm_acc_hi"], one["masked_ce_lo"]) == ("0.15", "0.35", "")  # evaluate's interval, none
    assert (one["run"], one["interval"]) == ("t", "evaluate")
    assert (tmp_path / "sweep.png").stat().st_size > 1000
