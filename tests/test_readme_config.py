"""The README's "bring your own teachers" config is complete and valid: every key known, every value of
the right type; only its folders and corpora are missing here."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from mergedistill.config import load_config
from mergedistill.errors import ConfigError

README = Path(__file__).resolve().parent.parent / "README.md"


def test_bring_your_own_teachers_config_is_valid(workdir):
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Bring your own teachers"):]
    block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    data = yaml.safe_load(block)
    assert set(data["teachers"]) == {"xlmr", "indic", "camembert", "jabert", "mbert"}
    with pytest.raises(ConfigError) as e:
        load_config(None, data=data)
    problems = e.value.problems
    assert problems and all("no folder" in p or "no file" in p for p in problems), problems
    # with its folders and corpora in place it loads as it is
    for name, t in data["teachers"].items():
        if not t["path"].startswith("bert-base"):
            (workdir / t["path"]).mkdir(parents=True)
    for lc in data["languages"].values():
        for split in ("train", "valid", "test"):
            (workdir / lc[split]).parent.mkdir(parents=True, exist_ok=True)
            (workdir / lc[split]).write_text("text\n")
    cfg = load_config(None, data=yaml.safe_load(block))
    assert cfg.student.init == "teacher:xlmr" and cfg.vocab.prune and cfg.teacher_of("ja") == "jabert"
