"""Config loading: every problem at once, overrides, and --help documenting every field."""
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

    from mergedistill.cli import FLAGS, STAGES, build_parser, flag_name, stage_function

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
        assert all(getattr(args, o) == "xx" for o in options)
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
