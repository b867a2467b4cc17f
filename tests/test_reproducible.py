"""The same config and seed give the same bytes: two tiny runs of the whole pipeline, teachers included, each in a
fresh folder and in processes of its own (other hash seeds for Python's and the `tokenizers` library's hash maps),
give every artifact the same hash: teacher weights and tokenizers, the vocabulary, shards, students, result tables."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SENTENCES

LANGS = ("de", "ru", "ja")

# JSON keys and CSV columns (or their last `/` part) that say when or how fast, never what: left out of the
# comparison; everything else must be equal.
TIMING_KEYS = {"wall_s", "setup_s", "prep_s", "tokenizer_s", "eval_s", "train_s", "total_s", "seconds", "created",
               "step_s", "tokens_per_s"}

TEACHERS_YAML = """
corpora: corpora
defaults:
  vocab_size: 300
  hidden: 32
  layers: 1
  heads: 2
  intermediate: 64
  dropout: 0.1            # dropout draws from the global generator: seeded too
  train: {seq_len: 32, batch_size: 8, max_steps: 6, eval_every: 3, eval_sequences: 8, log_every: 3,
          short_seq_lens: [16], short_seq_fraction: 0.5, accelerator: cpu, init_output_bias: true}
teachers:
  de: {languages: [de], tokenizer: wordpiece}
  ru: {languages: [ru], tokenizer: byte-bpe}
  ja: {languages: [ja], tokenizer: unigram}
  multi: {languages: [de, ru, ja], tokenizer: sp-bpe}
eval: {pll_lines: 3, acc_sequences: 8}
"""


def _run_yaml() -> str:
    langs = {lang: {"train": f"corpora/{lang}/train.txt", "valid": f"corpora/{lang}/valid.txt",
                    "test": f"corpora/{lang}/test.jsonl", "teacher": lang, "candidates": ["multi"]} for lang in LANGS}
    return json.dumps({
        "run": "r",
        "teachers": {name: {"path": f"teachers/{name}"} for name in (*LANGS, "multi")},
        "languages": langs,
        "vocab": {"prune": True, "prune_candidates": True},
        "data": {"seq_len": 32, "shard_lines": 10, "top_k": 4},
        "student": {"hidden": 32, "heads": 2, "layers": 1, "intermediate": 64, "init": "teacher:multi"},
        "train": {"max_steps": 4, "val_every": 2, "batch_size": 4, "warmup_steps": 1},
        "eval": {"max_lines": 8, "pll_lines": 2, "retrieval_pairs": 6, "bootstrap": 100, "char_languages": ["ja"]},
    })  # JSON is YAML


def _pipeline(root: Path, hash_seed: str) -> None:
    """corpora -> teachers (two at a time, in worker processes, as `make teachers` does) -> `mergedistill run`."""
    for lang in LANGS:
        (root / "corpora" / lang).mkdir(parents=True)
        for split, reps in (("train", 10), ("valid", 3)):
            lines = [f"{s} ({i})" for i in range(reps) for s in SENTENCES[lang]]
            (root / "corpora" / lang / f"{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        test = [json.dumps({"text": f"{s} [{i}]", "key": f"k{i}.{j}"}, ensure_ascii=False)
                for i in range(3) for j, s in enumerate(SENTENCES[lang][:3])]  # keys align paragraphs across languages
        (root / "corpora" / lang / "test.jsonl").write_text("\n".join(test) + "\n", encoding="utf-8")
    (root / "teachers.yaml").write_text(TEACHERS_YAML)
    (root / "run.yaml").write_text(_run_yaml())
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    for cmd in (["-m", "mergedistill.demo.teachers_build", "--config", "teachers.yaml", "--out", "teachers", "-j", "2"],
                ["-m", "mergedistill", "run", "--config", "run.yaml"]):
        out = subprocess.run([sys.executable, *cmd], cwd=root, env=env, capture_output=True, text=True, timeout=1800)
        assert out.returncode == 0, f"{' '.join(cmd)}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"


def _timing(key: str) -> bool:
    return key.rsplit("/", 1)[-1] in TIMING_KEYS


def _without_timing(value):
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items() if not _timing(k)}
    if isinstance(value, list):
        return [_without_timing(v) for v in value]
    return value


def _canonical(value, root: str):
    """A Lightning checkpoint's content, comparable across folders: tensors by their bytes, `root` cut out of the
    paths that its ModelCheckpoint callbacks record (where the run was, not what it computed)."""
    import torch

    if isinstance(value, dict):
        return sorted((_canonical(k, root), _canonical(v, root)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return [_canonical(v, root) for v in value]
    if isinstance(value, torch.Tensor):
        return (str(value.dtype), tuple(value.shape), hashlib.sha256(value.detach().contiguous().view(-1).view(torch.uint8)
                                                                      .numpy().tobytes()).hexdigest())
    if isinstance(value, str):
        return value.replace(root, "<root>")
    return repr(value)


def _digest(path: Path, root: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".ckpt":
        import torch

        data = repr(_canonical(torch.load(path, map_location="cpu", weights_only=False), str(root))).encode()
    elif path.suffix == ".json":
        data = json.dumps(_without_timing(json.loads(data)), sort_keys=True).encode()
    elif path.suffix == ".csv":
        rows = list(csv.DictReader(io.StringIO(data.decode("utf-8"))))  # results.csv, logs/metrics.csv, ...
        data = json.dumps([_without_timing(r) for r in rows]).encode()
    return hashlib.sha256(data).hexdigest()


def artifact_hashes(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file the pipeline wrote: JSON and CSV without timing fields; not the
    Markdown reports (prose with dates and durations; their figures are in the CSV and JSON beside them), nor the
    lock files (a pid)."""
    out = {}
    for top in ("teachers", "vocab", "runs"):
        for p in sorted((root / top).rglob("*")):
            if p.is_file() and p.suffix != ".md" and not p.name.startswith(".lock"):
                out[str(p.relative_to(root))] = _digest(p, root)
    return out


@pytest.mark.slow
def test_two_runs_from_the_same_config_give_the_same_bytes(tmp_path):
    hashes = []
    for i, hash_seed in enumerate(("1", "2")):
        root = tmp_path / f"run{i}"
        root.mkdir()
        _pipeline(root, hash_seed)
        hashes.append(artifact_hashes(root))
    a, b = hashes
    assert a.keys() == b.keys()
    for must in ("teachers/de/model.safetensors", "teachers/ja/tokenizer.json", "teachers/multi/model.safetensors",
                 "vocab/r/vocab.txt", "vocab/r/idmaps/ja.npy", "runs/r/train/export/model.safetensors",
                 "runs/r/baseline/export/model.safetensors", "runs/r/eval/results.csv"):
        assert must in a, f"{must} was not written: {sorted(a)}"
    assert any(k.startswith("runs/r/data/") and k.endswith(".arrow") for k in a)
    differ = sorted(k for k in a if a[k] != b[k])
    assert not differ, f"{len(differ)} of {len(a)} artifacts differ between two runs: {differ}"
