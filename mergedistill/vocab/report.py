"""The vocabulary stage's report: markdown for people, CSV and JSON for tools."""
from __future__ import annotations

from pathlib import Path

from mergedistill.fsutil import write_json_atomic, write_text_atomic
from mergedistill.tables import csv_text, markdown_table


def fertility_rows(stats: dict) -> tuple[list[str], list[list]]:
    header = ["language", "teacher", "lines", "words", "chars", "tokens", "tokens/word", "tokens/char", "unk %"]
    rows = []
    for f in stats["fertility"]:
        rows.append([
            f["language"], f["teacher"], f["lines"], f["words"], f["chars"], f["tokens"],
            f["tokens"] / max(f["words"], 1), f["tokens"] / max(f["chars"], 1), 100.0 * f["unk"] / max(f["tokens"], 1),
        ])
    return header, rows


def write_report(stats: dict, folder: Path) -> None:
    """report.md, report.json, teachers.csv, overlap.csv, fertility.csv."""
    names = [t["name"] for t in stats["teachers"]]
    t_header = ["teacher", "tokenizer", "source", "vocabulary", "kept", "languages"]
    t_rows = [[t["name"], t["tokenizer"], t["source"], t["size"], t["kept"], ", ".join(t["languages"]) or "-"] for t in stats["teachers"]]

    matrix = stats["overlap"]
    o_header = ["shared tokens"] + names
    o_rows = []
    for i, a in enumerate(names):
        row: list = [a]
        for j, _ in enumerate(names):
            shared = matrix[i][j]
            smaller = min(matrix[i][i], matrix[j][j]) or 1
            row.append(f"{shared:,}" if i == j else f"{shared:,} ({100.0 * shared / smaller:.1f}%)")
        o_rows.append(row)
    f_header, f_rows = fertility_rows(stats)

    emb = stats["embedding_params"]
    pruned = stats["pruned"]
    lines = [
        f"# Joint vocabulary `{stats['run']}`",
        "",
        f"Vocabulary fingerprint `{stats['fingerprint']}`; built in {stats['seconds']:.1f} s.",
        "",
        "## Teachers",
        "",
        markdown_table(t_header, t_rows),
        "",
        "## Joint vocabulary",
        "",
        f"- joint size: **{stats['joint_size']:,}** student tokens"
        + (f" after pruning ({stats['joint_size_unpruned']:,} before)" if pruned else " (no pruning)"),
        f"- the union of the teachers' {sum(t['size'] for t in stats['teachers']):,} tokens; "
        "[PAD] [UNK] [CLS] [SEP] [MASK] are ids 0-4 and every teacher's own specials map onto them",
        "",
        "## Pairwise overlap",
        "",
        "Tokens two teachers share (same meaning: word-initial or continuation, same text), before pruning; "
        "in brackets, as a share of the smaller vocabulary.",
        "",
        markdown_table(o_header, o_rows),
        "",
        "## Fertility on the routed corpora",
        "",
        f"Each language tokenized by its teacher (first {stats['report_lines']:,} lines of its train split"
        if stats["report_lines"] else "Each language tokenized by its teacher (all of its train split",
    ]
    lines[-1] += "). Words are whitespace-separated; for languages written without spaces, tokens/char is the comparable figure."
    lines += ["", markdown_table(f_header, f_rows) if f_rows else "(no languages routed)", ""]
    lines += [
        "## Embedding parameters",
        "",
        f"Student hidden size {emb['hidden']}: input embeddings (tied with the output layer) plus the output bias, "
        f"(hidden + 1) x vocabulary.",
        "",
        markdown_table(["", "vocabulary", "parameters"], [
            ["before pruning", stats["joint_size_unpruned"], emb["before"]],
            ["after pruning" if pruned else "without pruning", stats["joint_size"], emb["after"]],
            ["saved", stats["joint_size_unpruned"] - stats["joint_size"], emb["before"] - emb["after"]],
        ]),
        "",
    ]
    if pruned:
        lines += [
            "Pruning keeps, per teacher, the tokens it produced on the corpora routed to it, its specials"
            + (", every single-character piece" if stats.get("keep_single_chars") else "")
            + " and, for BPE, the pieces those are merged from. A pruned token maps to -1 in the teacher's id map "
            "([UNK] in inputs, dropped from teacher predictions).",
            "",
        ]
    sz = stats.get("student_size")
    if sz:
        lines += [
            "## Student size",
            "",
            f"A student of {sz['layers']} layers x {sz['hidden']} over this vocabulary; float32 weights as exported "
            "(training checkpoints also hold AdamW's two moments: about 3x).",
            "",
            markdown_table(["", "parameters", "share", "exported MB"], [
                ["body (transformer layers, positions, head transform)", sz["body"], f"{100 * (1 - sz['share']):.1f}%",
                 f"{sz['export_body_mb']:.1f}"],
                ["embeddings (tied input/output, output bias)", sz["embeddings"], f"{100 * sz['share']:.1f}%",
                 f"{sz['export_embeddings_mb']:.1f}"],
                ["total", sz["total"], "100%", f"{sz['export_mb']:.1f}"],
            ]),
            "",
        ]
        if sz["share"] > 0.8 and not pruned:
            lines += ["More than 80% of the student is embeddings: `vocab.prune: true` keeps only the tokens each teacher "
                      "produces on the corpora routed to it.", ""]
    write_text_atomic(folder / "report.md", "\n".join(lines))
    write_text_atomic(folder / "teachers.csv", csv_text(t_header, t_rows))
    write_text_atomic(folder / "overlap.csv", csv_text(["teacher"] + names, [[a] + list(matrix[i]) for i, a in enumerate(names)]))
    write_text_atomic(folder / "fertility.csv", csv_text(f_header, f_rows))
    write_json_atomic(folder / "report.json", stats)
