"""`mergedistill evaluate` end to end on tiny teachers and a tiny export built here.

The student is the routed teacher `wp` itself with its rows re-indexed to student ids (every other
student row unreachable), so on wp's languages it must match that teacher exactly: same accuracy,
agreement 1, same PLL, same retrieval. That pins the id mapping and the shared masked positions.
"""
from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

from conftest import SENTENCES, in_dir
from mergedistill.cli import main
from mergedistill.config import load_config
from mergedistill.data.masking import IGNORE_INDEX
from mergedistill.demo.source_task import build_source_task
from mergedistill.errors import UserError
from mergedistill.eval.report import set_card_section
from mergedistill.eval.stage import run_evaluate
from mergedistill.vocab.stage import load_vocab

pytestmark = pytest.mark.usefixtures("one_thread")


ROUTING = {"en": ("wp", ["bbpe"]), "de": ("wp", ["bbpe", "multi"]), "ru": ("uni", ["multi"]), "ja": ("spbpe", ["multi"])}
# float32: the exactness checks below compare models that compute the same function; `auto` would pick bfloat16
# on a CPU with native bf16, whose rounding flips near-tied predictions
EVAL = {"max_lines": 40, "pll_lines": 5, "batch_size": 8, "retrieval_pairs": 22, "char_languages": ["ja"], "mask_prob": 0.3,
        "dtype": "float32"}
NEG = -1e4  # a bias no prediction can overcome


def paragraph(lang: str, k: int) -> str:
    s = SENTENCES[lang]
    m = len(s)
    return " ".join(s[(k // m ** i) % m] for i in range(3))  # distinct for k < m**3 (27 or 64)


def write_corpora(root: Path) -> dict[str, dict[str, str]]:
    out = {}
    for lang in ROUTING:
        d = root / "corpora" / lang
        d.mkdir(parents=True)
        for split, n in (("train", 36), ("test", 24)):
            rows = [{"text": paragraph(lang, k), "source": "help" if k % 2 else "man", "doc": f"d{k}", "key": f"k{k}"}
                    for k in range(n)]
            (d / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        out[lang] = {"train": str(d / "train.jsonl"), "test": str(d / "test.jsonl")}
    return out


def trained_teacher(src: Path, dst: Path) -> None:
    """The wp teacher after 150 MLM steps on the en/de paragraphs, so that its predictions depend on the
    context (a random tiny model predicts one token everywhere, whatever it reads), with its special
    tokens made unpredictable (its top-1 over all tokens is then its top-1 over the tokens the student
    keeps, so the re-indexed student can agree everywhere)."""
    from transformers import AutoTokenizer

    from mergedistill.data.masking import MLMCollator
    from mergedistill.data.packing import pack_texts

    shutil.copytree(src, dst)
    tok = AutoTokenizer.from_pretrained(str(dst))
    model = BertForMaskedLM.from_pretrained(str(dst))
    packed = pack_texts(tok, [paragraph(lang, k) for lang in ("en", "de") for k in range(36)], 32)
    torch.manual_seed(0)  # dropout
    collate, g = MLMCollator(packed, tok, 0.15, seed=0), torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        loss = model(**collate(torch.randint(len(packed), (16,), generator=g).tolist())).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        model.cls.predictions.bias[tok.all_special_ids] = NEG
    model.eval().save_pretrained(str(dst))


def reindexed(teacher: Path, idmap, size: int) -> BertForMaskedLM:
    """The teacher as a student: row t of its embeddings and output bias moved to student id idmap[t]."""
    t = BertForMaskedLM.from_pretrained(str(teacher))
    cfg = BertConfig(**{**t.config.to_dict(), "vocab_size": size, "pad_token_id": 0})
    s = BertForMaskedLM(cfg)
    ids = torch.as_tensor(idmap, dtype=torch.long)
    with torch.no_grad():
        sd = t.state_dict()
        for name, p in s.state_dict().items():
            if name == "bert.embeddings.word_embeddings.weight":
                p.zero_()
                p[ids] = sd[name]
            elif name in ("cls.predictions.bias", "cls.predictions.decoder.bias"):
                p.fill_(NEG)
                p[ids] = sd[name]
            elif name != "cls.predictions.decoder.weight":
                p.copy_(sd[name])
    return s.eval()


def write_export(folder: Path, model, cfg, vrec, card: str) -> None:
    model.save_pretrained(str(folder))
    for t in sorted({teacher for teacher, _ in ROUTING.values()}):
        shutil.copytree(cfg.vocab_dir / "tokenizers" / t, folder / "tokenizers" / t)
    (folder / "languages.json").write_text(json.dumps({lang: f"tokenizers/{t}" for lang, (t, _) in ROUTING.items()}))
    (folder / "mergedistill.json").write_text(json.dumps({"vocab": vrec["vocab"]}))
    (folder / "README.md").write_text(card, encoding="utf-8")


CARD = "# t\n\nA student.\n\n## Training\n\n- tiny\n\n## Evaluation\n\nold numbers\n\n## License\n\nMIT\n"


def write_config(work: Path, teachers: dict[str, Path], corpora, **eval_extra) -> Path:
    task = {
        "train": {lang: f"runs/t/tasks/source/{lang}.train.jsonl" for lang in ROUTING},
        "test": {lang: f"runs/t/tasks/source/{lang}.test.jsonl" for lang in ROUTING},
        "epochs": 1, "max_train": 16, "max_test": 16, "lr": 0.001, "zero_shot_from": ["en"],
    }
    cfg = {
        "run": "t",
        "teachers": {n: {"path": str(p)} for n, p in teachers.items()},
        "languages": {lang: {**corpora[lang], "teacher": t, "candidates": c} for lang, (t, c) in ROUTING.items()},
        "data": {"seq_len": 32},
        "eval": {**EVAL, "downstream": {"source": task}, **eval_extra},
    }
    path = work / "c.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_teachers):
    """vocab built, student + baseline exported, evaluate run once; yields (work dir, config path)."""
    work = tmp_path_factory.mktemp("evaluate")
    with in_dir(work):
        teachers = dict(tiny_teachers)
        trained_teacher(tiny_teachers["wp"], work / "wp-teacher")
        teachers["wp"] = work / "wp-teacher"
        cfg_path = write_config(work, teachers, write_corpora(work))
        assert main(["vocab", "--config", str(cfg_path)]) == 0
        cfg = load_config(cfg_path)
        vocab, vrec = load_vocab(cfg)
        write_export(cfg.run_dir / "train" / "export", reindexed(teachers["wp"], vocab.idmaps["wp"], vocab.size), cfg, vrec, CARD)
        torch.manual_seed(0)
        base = BertForMaskedLM(BertConfig(vocab_size=vocab.size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=64, max_position_embeddings=64, pad_token_id=0))
        write_export(cfg.run_dir / "baseline" / "export", base, cfg, vrec, "# baseline\n")
        build_source_task(cfg, train_per_class=100, test_per_class=12, min_per_class=5)  # the demo's task, as `make demo` builds it
        assert main(["evaluate", "--config", str(cfg_path)]) == 0
        yield work, cfg_path


def results(work: Path) -> list[dict]:
    with open(work / "runs" / "t" / "eval" / "results.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def value(rows, section, lang, model, metric) -> float:
    hits = [r for r in rows if (r["section"], r["language"], r["model"], r["metric"]) == (section, lang, model, metric)]
    assert len(hits) == 1, (section, lang, model, metric, len(hits))
    return float(hits[0]["value"])


def test_outputs_exist_with_the_expected_rows(evaluated):
    work, _ = evaluated
    out = work / "runs" / "t" / "eval"
    rows = results(work)
    assert list(rows[0]) == ["section", "language", "model", "role", "metric", "value", "n"]
    got = {(r["section"], r["language"], r["model"], r["metric"]) for r in rows}
    for lang, (routed, cands) in ROUTING.items():
        pll = "bits_per_char" if lang == "ja" else "pll_per_word"
        unit = "chars_scored" if lang == "ja" else "words_scored"
        diffs = [f"{m}_diff{s}" for m in ("mlm_acc", "masked_ce") for s in ("", "_lo", "_hi")]
        for model in ("student", "baseline"):
            for metric in ("mlm_acc", "masked_ce", "agreement", pll, "pppl", "tokens_scored", unit, *diffs):
                assert ("intrinsic", lang, model, metric) in got, (lang, model, metric)
        for t in [routed, *cands]:
            for metric in ("mlm_acc", pll, "pppl", "tokens_scored", unit):
                assert ("intrinsic", lang, f"teacher:{t}", metric) in got, (lang, t, metric)
            assert ("intrinsic", lang, f"teacher:{t}", "agreement") not in got
            assert (("intrinsic", lang, f"teacher:{t}", "masked_ce") in got) == (t == routed)  # like for like: the routed one
        assert ("intrinsic", lang, f"teacher:{routed}", "gold_pruned") in got
        assert ("intrinsic", lang, "unigram", "mlm_acc") in got
    wrong_unit = {(r["language"], r["metric"]) for r in rows if r["metric"] in ("bits_per_char", "pll_per_word")}
    assert ("ja", "pll_per_word") not in wrong_unit and ("en", "bits_per_char") not in wrong_unit
    roles = {(r["language"], r["model"]): r["role"] for r in rows if r["section"] == "intrinsic"}
    assert roles[("de", "teacher:wp")] == "routed teacher" and roles[("de", "teacher:multi")] == "candidate teacher"
    # every language pair shares 24 keys (>= 20): capped at 22 paragraphs, both directions, per model covering both
    retr = {(r["language"], r["model"]): int(r["n"]) for r in rows if r["section"] == "retrieval"}
    assert all(n == 22 for n in retr.values())
    assert {lang for lang, m in retr if m == "student"} == {f"{a}->{b}" for a in ROUTING for b in ROUTING if a != b}
    assert {lang for lang, m in retr if m == "teacher:wp"} == {"en->de", "de->en"}
    multi = ("de", "ru", "ja")
    assert {lang for lang, m in retr if m == "teacher:multi"} == {f"{a}->{b}" for a in multi for b in multi if a != b}
    # downstream: in-language for every model knowing the language, zero-shot from en for the models knowing both
    down = {(r["language"], r["model"], r["metric"]) for r in rows if r["section"] == "downstream"}
    for lang in ROUTING:
        assert (lang, "student", "source/acc") in down and (lang, "baseline", "source/acc") in down
        assert (lang, f"teacher:{ROUTING[lang][0]}", "source/acc") in down
    for lang in ("de", "ru", "ja"):
        assert (lang, "student", "source/acc_from_en") in down and (lang, "baseline", "source/acc_from_en") in down
    assert ("de", "teacher:wp", "source/acc_from_en") in down and ("de", "teacher:bbpe", "source/acc_from_en") in down
    assert ("ru", "teacher:wp", "source/acc_from_en") not in down
    assert all(0.0 <= float(r["value"]) <= 1.0 for r in rows if r["section"] != "intrinsic")
    for p in ("accuracy.png", "pll.png", "vs_teacher_mlm_acc.png", "vs_teacher_masked_ce.png", "retrieval_student.png",
              "retrieval_baseline.png", "downstream_source.png"):
        assert (out / "plots" / p).stat().st_size > 1000, p
    report = (out / "report.md").read_text(encoding="utf-8")
    for needle in ("## Intrinsic", "### ja", "bits/char", "## Cross-lingual retrieval", "zero-shot from en", "plots/accuracy.png",
                   "## Student vs routed teacher, like for like", "masked CE (nats)", "**masked CE** (`masked_ce`)",
                   "weights: the last step's (exported before train.export existed)"):
        assert needle in report, needle
    # the task files the demo built are what the downstream rows were scored on
    task = [json.loads(x) for x in (work / "runs" / "t" / "tasks" / "source" / "de.test.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {t["label"] for t in task} == {"help", "man"} and len(task) == 24
    assert {int(r["n"]) for r in rows if r["section"] == "downstream"} == {16}  # max_test of the 24


def test_the_reindexed_teacher_as_student_matches_its_teacher(evaluated):
    work, _ = evaluated
    rows = results(work)
    for lang in ("en", "de"):
        assert value(rows, "intrinsic", lang, "teacher:wp", "mlm_acc") > 0.05  # it reads its context: equality means something
        assert value(rows, "intrinsic", lang, "student", "mlm_acc") == pytest.approx(
            value(rows, "intrinsic", lang, "teacher:wp", "mlm_acc"))
        assert value(rows, "intrinsic", lang, "student", "agreement") == 1.0
        assert value(rows, "intrinsic", lang, "baseline", "agreement") < 0.5
        for metric in ("pll_per_word", "pppl", "tokens_scored", "words_scored"):
            assert value(rows, "intrinsic", lang, "student", metric) == pytest.approx(
                value(rows, "intrinsic", lang, "teacher:wp", metric), rel=1e-4), (lang, metric)
        # like for like: the same pieces for both, so the same cross-entropy; the paired difference is 0 on every resample
        assert value(rows, "intrinsic", lang, "student", "masked_ce") == pytest.approx(
            value(rows, "intrinsic", lang, "teacher:wp", "masked_ce"), rel=1e-4)
        assert [value(rows, "intrinsic", lang, "student", f"mlm_acc_diff{s}") for s in ("", "_lo", "_hi")] == [0.0, 0.0, 0.0]
        for s in ("", "_lo", "_hi"):
            assert value(rows, "intrinsic", lang, "student", f"masked_ce_diff{s}") == pytest.approx(0.0, abs=1e-4)
        # the random baseline is far behind: its interval lies wholly on the worse side
        assert value(rows, "intrinsic", lang, "baseline", "mlm_acc_diff_hi") < 0
        assert value(rows, "intrinsic", lang, "baseline", "masked_ce_diff_lo") > 1.0
    for d in ("en->de", "de->en"):
        assert value(rows, "retrieval", d, "student", "retrieval_acc@1") == value(
            rows, "retrieval", d, "teacher:wp", "retrieval_acc@1")
    n = [r for r in rows if (r["language"], r["model"], r["metric"]) == ("en", "student", "mlm_acc")][0]["n"]
    assert int(n) > 20  # 30% of the tokens of up to 40 lines
    lines = [r for r in rows if (r["language"], r["model"], r["metric"]) == ("en", "student", "mlm_acc_diff")][0]["n"]
    assert 10 < int(lines) <= 24  # the bootstrap resamples the test lines holding a masked position (24 in the split)
    report = (work / "runs" / "t" / "eval" / "report.md").read_text(encoding="utf-8")
    table = report[report.index("## Student vs routed teacher"):report.index("## Intrinsic")]
    en = next(line for line in table.splitlines() if line.startswith("| en | wp |"))
    assert "+0.000 [+0.000, +0.000] | level" in en
    assert "The student, like for like with the routed teacher: at or above the teacher's masked accuracy on" in table
    assert "The baseline, like for like with the routed teacher" in table


def test_model_card_gets_the_results_table(evaluated):
    work, _ = evaluated
    card = (work / "runs" / "t" / "train" / "export" / "README.md").read_text(encoding="utf-8")
    assert "old numbers" not in card and card.count("## Evaluation") == 1
    assert card.index("## Training") < card.index("## Evaluation") < card.index("## License")
    section = card[card.index("## Evaluation"):card.index("## License")]
    assert "| en | wp |" in section and "runs/t/eval/report.md" in section and "Cross-lingual retrieval" in section
    assert "zero-shot from en" in section
    assert "The student, like for like with the routed teacher: at or above the teacher's masked accuracy on" in section


def test_rerun_skips_and_force_redoes(evaluated, caplog):
    work, cfg_path = evaluated
    report = work / "runs" / "t" / "eval" / "report.md"
    before = report.stat().st_mtime_ns
    words = value(results(work), "intrinsic", "en", "student", "words_scored")
    cfg = load_config(cfg_path)
    with caplog.at_level("INFO"):
        run_evaluate(cfg)
    assert "skipping" in caplog.text and report.stat().st_mtime_ns == before
    # a changed setting is a new evaluation: only intrinsic, fewer PLL lines
    cfg = load_config(cfg_path, ["--eval.pll_lines=2", "--eval.retrieval=false", "--eval.downstream={}", "--eval.baseline=false"])
    run_evaluate(cfg)
    rows = results(work)
    assert {r["section"] for r in rows} == {"intrinsic"} and not any(r["model"] == "baseline" for r in rows)
    assert value(rows, "intrinsic", "en", "student", "words_scored") < words
    assert not list((work / "runs" / "t").glob(".eval.*"))  # no temporary folders left behind


def test_missing_export_names_the_command(tiny_teachers, workdir, capsys):
    cfg_path = write_config(workdir, tiny_teachers, write_corpora(workdir))
    assert main(["evaluate", "--config", str(cfg_path)]) == 2
    err = capsys.readouterr().err
    assert f"mergedistill train --config {cfg_path}" in err and "runs/t/train/export" in err
    assert "mergedistill vocab --config" in err  # every problem at once
    assert not (workdir / "runs" / "t" / "eval").exists()


def test_bad_inputs_are_reported_together_before_any_work(evaluated):
    work, cfg_path = evaluated
    cfg = load_config(cfg_path, ["--eval.downstream.source.zero_shot_from=[xx]", "--eval.downstream.source.test.fr=nowhere.jsonl",
                                 "--languages.en.teacher=uni"])
    with pytest.raises(UserError) as e:
        run_evaluate(cfg, force=True)
    text = e.value.render()
    assert "zero_shot_from: 'xx'" in text and "test.fr: not a language of this run" in text
    assert "another routing for en (tokenizers/wp, config: tokenizers/uni)" in text


def test_card_section_is_appended_or_replaced_in_place():
    card = "# m\n\n## Use it\n\ntext\n"
    once = set_card_section(card, "| a |")
    assert once == "# m\n\n## Use it\n\ntext\n\n## Evaluation\n\n| a |\n"
    assert set_card_section(once, "| b |") == once.replace("| a |", "| b |")  # the last section, replaced
    middle = "# m\n\n## Evaluation\n\nold\n\n## Training\n\nx\n"
    assert set_card_section(middle, "new") == "# m\n\n## Evaluation\n\nnew\n\n## Training\n\nx\n"


def test_label_mismatch_explains_misleading_zero_shot_pairs():
    from mergedistill.eval.stage import label_mismatch

    assert label_mismatch({"help", "man"}, {"man", "help"}) is None
    msg = label_mismatch({"help", "man", "fortune"}, {"help", "man"})
    assert "fortune never occur in the target" in msg
    msg = label_mismatch({"help"}, {"help", "man"})
    assert "man were never trained on" in msg


def test_student_accuracy_is_over_the_ids_the_language_can_write(evaluated):
    """A student whose head favours an id that English's tokenizer (wp's) cannot write: evaluate's accuracy
    and agreement ignore it, as the exported student's per-language use does."""
    from mergedistill.eval.metrics import masked_eval_set, masked_top1
    from mergedistill.eval.models import Export, Models
    from mergedistill.eval.stage import intrinsic, preflight

    work, cfg_path = evaluated
    with in_dir(work):
        cfg = load_config(cfg_path, ["--eval.baseline=false"])
        plan = preflight(cfg)
        vocab = plan.vocab
        writable = set(vocab.producible_ids("wp").tolist())
        foreign = next(i for i in range(vocab.size) if i not in writable and vocab.keys[i][0] != "S")
        folder = work / "boosted-student"
        shutil.copytree(plan.student.folder, folder)
        model = BertForMaskedLM.from_pretrained(str(folder))
        with torch.no_grad():
            model.cls.predictions.bias[foreign] = 1e4
        model.save_pretrained(str(folder))
        rows = intrinsic(cfg, Models(cfg, Export.open("student", folder, [], "train"), None), plan, "en")
        # unrestricted, every prediction would be that foreign token (the student's tokenizer emits student ids)
        tok = AutoTokenizer.from_pretrained(str(folder / "tokenizers" / "wp"))
        eset = masked_eval_set(tok, ["The student learns from the teachers, and the teachers know their languages."], 32, 0.3, 0)
        top, _ = masked_top1(model.eval(), eset["input_ids"], eset["attention_mask"], eset["labels"] != IGNORE_INDEX)
    assert top.numel() and (top == foreign).all()
    got = {(r.model, r.metric): r.value for r in rows}
    assert got[("student", "agreement")] == 1.0
    assert got[("student", "mlm_acc")] == pytest.approx(got[("teacher:wp", "mlm_acc")]) and got[("student", "mlm_acc")] > 0.05


def test_gold_pieces_pruned_from_the_student_vocabulary_are_left_out_of_cross_entropy(evaluated):
    """Prune wp's most frequent masked piece from the student vocabulary (its id map says -1): those positions
    count as misses for every model and drop out of masked CE for every model, which stays finite."""
    import copy

    from mergedistill.corpus import sample_lines, spread_subset
    from mergedistill.eval.metrics import masked_eval_set
    from mergedistill.eval.models import Models
    from mergedistill.eval.stage import intrinsic, preflight

    work, cfg_path = evaluated
    with in_dir(work):
        cfg = load_config(cfg_path, ["--eval.baseline=false"])
        plan = preflight(cfg)
        models = Models(cfg, plan.student, None)
        _, tok = models.teacher("wp")
        texts = spread_subset(sample_lines(cfg.languages["en"].test, "t", None), cfg.eval.max_lines, cfg.eval.seed)
        seq_len = min(models.max_len(k) for k in ("teacher:wp", "student"))  # as intrinsic packs
        eset = masked_eval_set(tok, texts, seq_len, cfg.eval.mask_prob, cfg.eval.seed)
        gold = eset["labels"][eset["labels"] != IGNORE_INDEX]
        piece = int(torch.mode(gold).values)
        vocab = copy.copy(plan.vocab)
        vocab.idmaps = {**vocab.idmaps, "wp": vocab.idmaps["wp"].copy()}
        vocab.idmaps["wp"][piece] = -1
        plan.vocab = vocab
        rows = {(r.model, r.metric): r for r in intrinsic(cfg, models, plan, "en")}
    pruned = int((gold == piece).sum())
    assert pruned > 1
    assert rows[("teacher:wp", "gold_pruned")].value == pruned and rows[("teacher:wp", "gold_pruned")].n == gold.numel()
    for model in ("teacher:wp", "student"):
        assert rows[(model, "masked_ce")].n == gold.numel() - pruned and math.isfinite(rows[(model, "masked_ce")].value)
        assert rows[(model, "mlm_acc")].n == gold.numel()
    assert rows[("teacher:wp", "mlm_acc")].value <= 1 - pruned / gold.numel()  # the teacher cannot predict a pruned piece either
    assert math.isfinite(rows[("student", "masked_ce_diff_hi")].value)
