"""configs/teachers.yaml problems found while the config is read, before any teacher trains: a teacher that is
not a mapping, and a pretrained teacher's E5S1 file that is corrupt or has fewer layers than fit.train_layers."""
from __future__ import annotations

import pytest
from test_e5 import _teachers_yaml, tiny_tensors, write_tiny_e5

from mergedistill.demo.teachers_build import load_teachers_config, main
from mergedistill.errors import ConfigError


@pytest.fixture
def tiny_file(tmp_path):
    path = tmp_path / "tiny-q4.bin"
    write_tiny_e5(path, tiny_tensors())
    return path


def _problems(path) -> str:
    with pytest.raises(ConfigError) as e:
        load_teachers_config(str(path))
    return e.value.render()


def test_a_teacher_that_is_not_a_mapping_is_a_config_problem(tmp_path, tiny_file, capsys):
    """It used to end in an AttributeError traceback (exit 1) while `defaults` were merged into it."""
    path = _teachers_yaml(tmp_path, tiny_file)
    path.write_text(path.read_text().replace("de: {languages: [de], tokenizer: wordpiece}", "de: [de]"))
    assert "teachers.de: expected a mapping of settings" in _problems(path)
    assert main(["--config", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "teachers.de: expected a mapping" in err and "Traceback" not in err


def test_a_truncated_e5_file_is_refused_before_any_teacher_trains(tmp_path, tiny_file):
    """It used to be found only after the teachers trained from scratch had trained."""
    tiny_file.write_bytes(tiny_file.read_bytes()[: tiny_file.stat().st_size // 2])
    msg = _problems(_teachers_yaml(tmp_path, tiny_file))
    assert f"pretrained.e5.model_file: {tiny_file}: " in msg and "corrupt" in msg


def test_more_train_layers_than_the_e5_file_has_are_refused_naming_the_field(tmp_path, tiny_file):
    path = _teachers_yaml(tmp_path, tiny_file)
    path.write_text(path.read_text().replace("num_threads: 1}\n    acc_sequences", "num_threads: 1, train_layers: 5}\n    acc_sequences"))
    msg = _problems(path)
    assert f"pretrained.e5.fit.train_layers: 5 last layers to fit, but {tiny_file} has 2 encoder layers; set it to at most 2" in msg
