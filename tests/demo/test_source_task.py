"""The demo's labelled source task, built from JSON-lines corpora."""
from __future__ import annotations

import json
from pathlib import Path

from mergedistill.config import load_config
from mergedistill.demo.source_task import build_source_task, source_task_dir


def _corpus(path: Path, counts: dict[str, int]) -> None:
    rows = [{"text": f"{src} paragraph {i}", "source": src, "doc": "d", "key": None} for src, n in counts.items() for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_source_task_is_balanced_capped_and_skips_single_source_languages(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    for lang, train, test in (("de", {"help": 500, "man": 40, "fortune": 5}, {"help": 200, "man": 12, "fortune": 30}),
                              ("en", {"help": 100}, {"help": 50})):
        (tmp_path / lang).mkdir()
        _corpus(tmp_path / lang / "train.jsonl", train)
        _corpus(tmp_path / lang / "test.jsonl", test)
        (tmp_path / lang / "train.txt").write_text("x\n")
    cfg = load_config(None, data={"run": "demo", "teachers": {"m": {"path": "some/hub-model"}},
                                  "languages": {"de": {"train": "de/train.txt", "test": "de/test.jsonl", "teacher": "m"},
                                                "en": {"train": "en/train.jsonl", "test": "en/test.jsonl", "teacher": "m"}}})
    with caplog.at_level("INFO"):
        files = build_source_task(cfg, train_per_class=100, test_per_class=20, min_per_class=10)
    assert "en skipped" in caplog.text
    where = "runs/demo/tasks/source"
    assert files == {"train": {"de": f"{where}/de.train.jsonl"}, "test": {"de": f"{where}/de.test.jsonl"}}
    train = [json.loads(x) for x in Path(files["train"]["de"]).read_text().splitlines()]
    test = [json.loads(x) for x in Path(files["test"]["de"]).read_text().splitlines()]
    count = lambda rows, s: sum(r["label"] == s for r in rows)  # noqa: E731
    assert (count(train, "help"), count(train, "man"), count(train, "fortune")) == (100, 40, 0)  # fortune: 5 < 10 in train
    assert (count(test, "help"), count(test, "man")) == (20, 12)
    assert {r["text"] for r in test} <= {f"{s} paragraph {i}" for s in ("help", "man") for i in range(200)}
    assert [r["label"] for r in train[:10]] != sorted(r["label"] for r in train[:10]) or len({r["label"] for r in train[:40]}) > 1
    # the sample spreads over the file rather than taking its head
    assert max(int(r["text"].split()[-1]) for r in train if r["label"] == "help") > 200
    first = Path(files["train"]["de"]).stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level("INFO"):
        assert build_source_task(cfg, train_per_class=100, test_per_class=20, min_per_class=10) == files
    assert "skipping" in caplog.text and Path(files["train"]["de"]).stat().st_mtime_ns == first
    assert source_task_dir(cfg) == Path("runs/demo/tasks/source")
