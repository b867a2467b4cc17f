"""Config loading: every problem at once, overrides, and --help documenting every field."""
import copy
import dataclasses
import subprocess
import sys
import typing

import pytest
import yaml

from mergedistill.cli import main
from mergedistill.config import RunConfig, load_config
from mergedistill.configlib import field_docs, is_internal, to_dict
from mergedistill.errors import ConfigError


@pytest.fixture
def base(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t").mkdir()
    (tmp_path / "de.txt").write_text("Hallo Welt\n", encoding="utf-8")
    return {
        "run": "r",
        "teachers": {"t": {"path": str(tmp_path / "t")}},
        "languages": {"de": {"train": "de.txt", "teacher": "t"}},
    }


def test_valid_config_loads_with_defaults(base):
    cfg = load_config(None, data=base)
    assert cfg.teacher_of("de") == "t"
    assert cfg.data.top_k == 8 and cfg.train.alpha == 0.5
    assert str(cfg.vocab_dir) == "vocab/r"


def test_overrides_reach_nested_fields_and_parse_types(base):
    cfg = load_config(None, ["--train.max_steps=30", "--train.devices=2", "--train.strategy=ddp", "--data.top_k=4"], data=base)
    assert cfg.train.max_steps == 30 and cfg.train.devices == 2 and cfg.train.strategy == "ddp" and cfg.data.top_k == 4
    assert load_config(None, ["--train.lr=3e-3"], data=base).train.lr == 0.003  # YAML 1.1 reads this as a string


def test_all_problems_are_reported_together(base):
    base["languages"]["fr"] = {"train": "missing.txt", "teacher": "nobody"}
    base["data"] = {"top_kk": 3, "seq_len": "long"}
    base["teachers"]["gone"] = {"path": "./no/such/folder"}
    with pytest.raises(ConfigError) as err:
        load_config(None, data=base)
    text = str(err.value)
    assert "data.top_kk: unknown key; did you mean 'top_k'?" in text
    assert "data.seq_len: expected an integer, got 'long'" in text
    assert "languages.fr.teacher: 'nobody' is not defined" in text
    assert "languages.fr.train: no file 'missing.txt'" in text
    assert "teachers.gone.path: no folder './no/such/folder'" in text
    assert len(err.value.problems) == 5


def test_language_without_teacher_uses_default_or_fails(base):
    base["languages"]["de"].pop("teacher")
    with pytest.raises(ConfigError, match="no teacher assigned"):
        load_config(None, data=base)
    base["default_teacher"] = "t"
    assert load_config(None, data=base).teacher_of("de") == "t"


def test_hub_ids_are_accepted_without_a_local_folder(base):
    base["teachers"]["hub"] = {"path": "google/muril-base-cased"}
    assert load_config(None, data=base).teachers["hub"].path == "google/muril-base-cased"


def test_literal_fields_suggest_the_closest_value(base):
    with pytest.raises(ConfigError, match="did you mean 'wandb'"):
        load_config(None, ["--train.logger=wandbb"], data=base)


def _all_fields(cls, prefix=""):
    for f in dataclasses.fields(cls):
        if is_internal(f):
            continue
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _all_fields(tp, f"{prefix}{f.name}.")
        elif typing.get_origin(tp) is dict and dataclasses.is_dataclass(typing.get_args(tp)[1]):
            yield f"{prefix}{f.name}.<name>"
            yield from _all_fields(typing.get_args(tp)[1], f"{prefix}{f.name}.<name>.")
        else:
            yield prefix + f.name


def test_every_field_has_a_docstring_and_appears_in_help(capsys):
    def check(cls):
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
            tp = typing.get_type_hints(cls)[f.name]
            inner = typing.get_args(tp)[1] if typing.get_origin(tp) is dict else tp
            if dataclasses.is_dataclass(inner):
                check(inner)
    check(RunConfig)
    with pytest.raises(SystemExit):
        main(["vocab", "--help"])
    out = capsys.readouterr().out
    for key in _all_fields(RunConfig):
        assert key in out, key
    assert "config_path" not in out  # set by the program, not a config key


def test_internal_fields_are_not_config_keys(base, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(base))
    cfg = load_config(path)
    assert cfg.config_path == str(path) and "config_path" not in to_dict(cfg)
    assert cfg.command("train") == f"mergedistill train --config {path}"
    with pytest.raises(ConfigError, match="config_path: unknown key"):
        load_config(None, data={**base, "config_path": "x.yaml"})


def test_cli_exit_2_and_message_for_bad_config(tmp_path, base, capsys):
    base["vocab"] = {"prune": "yes"}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(base))
    assert main(["vocab", "--config", str(cfg), "--student.hiden=4"]) == 2
    err = capsys.readouterr().err
    assert "vocab.prune: expected true or false" in err and "student.hiden: unknown key; did you mean 'hidden'?" in err


def test_every_stage_is_a_function_of_the_config_and_its_cli_flags():
    """The CLI's flags of each stage are exactly the keyword-only parameters of its function (no hidden
    flags the CLI cannot set), each documented."""
    import inspect

    from mergedistill.cli import FLAGS, STAGES, build_parser, flag_name, repeats, stage_function

    parser = build_parser()
    for name, (_, _, flags) in STAGES.items():
        params = inspect.signature(stage_function(name)).parameters
        assert list(params)[0] == "cfg", name
        kw = [p for p in params.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
        assert [p.name for p in kw] == [flag_name(f) for f in flags], name
        switches = [f for f in flags if "=" not in f]  # booleans, off by default
        options = [flag_name(f) for f in flags if "=" in f]  # take a value, required
        assert all(params[f].default is False for f in switches), name
        assert all(params[o].default is inspect.Parameter.empty for o in options), name
        assert all(FLAGS[flag_name(f)] for f in flags)
        argv = [name, *[f"--{f.replace('_', '-')}" for f in switches], *[a for o in options for a in (f"--{o.replace('_', '-')}", "xx")]]
        args = parser.parse_args(argv)
        assert all(getattr(args, f) is True for f in switches)
        assert all(getattr(args, flag_name(f)) == (["xx"] if repeats(f) else "xx") for f in flags if "=" in f)
        repeated = [flag_name(f) for f in flags if repeats(f)]  # given twice: the function gets both
        if repeated:
            opts = {o: "--" + o.replace("_", "-") for o in repeated}
            args = parser.parse_args([name, *[a for o in repeated for a in (opts[o], "xx", f"{opts[o]}=yy")]])
            assert all(getattr(args, o) == ["xx", "yy"] for o in repeated)
        if options:  # a required option left out is bad input: argparse exits 2
            with pytest.raises(SystemExit) as exit_:
                parser.parse_args([name])
            assert exit_.value.code == 2


def test_console_script_exit_code(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: x\nteachers: {}\nlanguages: {}\nbogus: 1\n")
    proc = subprocess.run([sys.executable, "-m", "mergedistill", "vocab", "--config", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "bogus: unknown key" in proc.stderr and "define at least one teacher" in proc.stderr


def test_routing_file_overrides_teachers(base, tmp_path):
    (tmp_path / "u").mkdir()
    base["teachers"]["u"] = {"path": str(tmp_path / "u")}
    (tmp_path / "routing.yaml").write_text("routing:\n  de: u\n")
    cfg = load_config(None, ["--routing=routing.yaml"], data=base)
    assert cfg.teacher_of("de") == "u"
    (tmp_path / "bad.yaml").write_text("routing:\n  xx: u\n  de: nobody\n")
    with pytest.raises(ConfigError) as err:
        load_config(None, ["--routing=bad.yaml"], data=base)
    assert "routes 'xx'" in str(err.value) and "'nobody' is not defined" in str(err.value)


def test_sample_lines_spreads_over_the_split_in_order_and_is_seeded(tmp_path):
    from mergedistill.corpus import sample_lines

    path = tmp_path / "test.txt"
    path.write_text("".join(f"line {i}\n\n" for i in range(1000)))  # blank lines are skipped
    a = sample_lines(str(path), "languages.xx.test", 50, seed=0)
    assert len(a) == 50 and len(set(a)) == 50
    idx = [int(t.split()[1]) for t in a]
    assert idx == sorted(idx) and idx[-1] > 500  # corpus order, not the opening 50 lines
    assert a == sample_lines(str(path), "languages.xx.test", 50, seed=0)
    assert a != sample_lines(str(path), "languages.xx.test", 50, seed=1)
    assert len(sample_lines(str(path), "languages.xx.test", None)) == 1000
    assert len(sample_lines(str(path), "languages.xx.test", 5000)) == 1000


# ---- value ranges: declared beside each field, checked at load, shown by --help ----------------------
def _numeric_fields(cls, prefix=""):
    """(dotted key, dataclass, field name) of every int/float field of every section."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if is_internal(f):
            continue
        tp = hints[f.name]
        inner = typing.get_args(tp)[1] if typing.get_origin(tp) is dict else tp
        if dataclasses.is_dataclass(inner):
            yield from _numeric_fields(inner, f"{prefix}{f.name}{'.<name>' if inner is not tp else ''}.")
        elif {int, float} & set(typing.get_args(tp) or (tp,)):
            yield f"{prefix}{f.name}", cls, f.name


def test_every_numeric_field_declares_a_range_holding_its_default():
    from mergedistill.configlib import field_ranges

    keys = []
    for key, cls, name in _numeric_fields(RunConfig):
        rng = field_ranges(cls).get(name)
        assert rng is not None, f"{key} declares no Range"
        default = next(f.default for f in dataclasses.fields(cls) if f.name == name)
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            assert default in rng, f"{key}: default {default} outside {rng}"
        keys.append(key)
    assert len(keys) >= 40 and "eval.downstream.<name>.epochs" in keys and "train.devices" in keys


BAD_VALUES = [
    ("train.batch_size", 0, ">= 1"), ("train.grad_accum", 0, ">= 1"), ("train.val_every", 0, ">= 1"),
    ("train.lr", -0.01, "> 0"), ("student.heads", 0, ">= 1"), ("student.layers", 0, ">= 1"),
    ("eval.batch_size", 0, ">= 1"), ("eval.mask_prob", 2, "in (0, 1)"), ("data.max_lines", 0, ">= 1"),
    ("train.devices", 0, ">= 1"), ("train.seed", -1, "in [0, 4294967295]"), ("vocab.report_lines", -5, ">= 0"),
    ("data.mask_prob", 1, "in (0, 1)"), ("train.alpha", 1.5, "in [0, 1]"), ("train.temperature", 0, "> 0"),
    ("ablate.train_steps", 0, ">= 1"), ("eval.pll_lines", 0, ">= 1"), ("data.workers", 0, ">= 1"),
]


@pytest.mark.parametrize("key,value,allowed", BAD_VALUES)
def test_out_of_range_values_are_refused_naming_the_field_and_the_range(base, key, value, allowed):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"--{key}={value}"], data=base)
    assert f"{key}: {value} is out of range; allowed: {allowed}" in str(err.value)


def test_ranges_inside_mappings_of_sections_are_checked(base):
    task = {"train": {"de": "x.jsonl"}, "test": {"de": "y.jsonl"}, "epochs": 0, "lr": -1}
    with pytest.raises(ConfigError) as err:
        load_config(None, data={**base, "eval": {"downstream": {"src": task}}})
    assert "eval.downstream.src.epochs: 0 is out of range; allowed: >= 1" in str(err.value)
    assert "eval.downstream.src.lr: -1 is out of range; allowed: > 0" in str(err.value)


def test_all_range_problems_come_together_and_boundaries_are_allowed(base):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["--train.batch_size=0", "--student.heads=0", "--data.max_lines=0"], data=copy.deepcopy(base))
    assert len(err.value.problems) == 3  # heads=0 is reported once (no division by zero in the cross-field checks)
    cfg = load_config(None, ["--train.alpha=0", "--train.alpha=1", "--data.max_lines=1", "--train.warmup_steps=0",
                             "--train.devices=auto", "--train.devices=2"], data=base)
    assert cfg.train.alpha == 1.0 and cfg.data.max_lines == 1 and cfg.train.devices == 2


def test_student_positions_must_cover_the_sequence_length(base):
    with pytest.raises(ConfigError, match=r"student.max_position: 64 is smaller than data.seq_len \(128\)"):
        load_config(None, ["--student.max_position=64"], data=base)
    assert load_config(None, ["--student.max_position=64", "--data.seq_len=64"], data=base).student.max_position == 64


def test_help_shows_each_numeric_fields_range(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "train.batch_size (int >= 1) [default: 32]" in out
    assert "eval.mask_prob (float in (0, 1)) [default: 0.15]" in out
    assert "data.max_lines (int >= 1 or null)" in out and "train.lr (float > 0)" in out


def test_cli_refuses_a_yaml_mapping_with_a_duplicate_key(tmp_path, base, capsys):
    (tmp_path / "fr.txt").write_text("Bonjour\n", encoding="utf-8")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("run: r\nteachers:\n  t: {path: t}\nlanguages:\n  de: {train: de.txt, teacher: t}\n"
                   "  de: {train: fr.txt, teacher: t}\n", encoding="utf-8")
    assert main(["vocab", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "duplicate key 'de' (lines 5 and 6)" in err and str(cfg) in err
