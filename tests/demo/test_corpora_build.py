"""The `make corpora` pipeline end to end on fixture 'packages' (unpacked trees, no network):
outputs, manifest, document-level split across languages, idempotence, caching and failure safety."""
from __future__ import annotations

import gzip
import json
import logging
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

from mergedistill.demo.corpora import build_corpora, language
from mergedistill.demo.corpora.__main__ import main
from mergedistill.demo.corpora.sources import (
    LanguageSpec,
    PackageError,
    PackageSpec,
    TreeSource,
)
from mergedistill.errors import UserError
from mergedistill.fsutil import sha256_file

FIX = Path(__file__).parent / "fixtures" / "corpora"
HAVE_GROFF = shutil.which("groff") is not None
SPLITS = ("train", "valid", "test")

GERMAN = ["Das Kapitel {i} erklärt, wie Sie die Ränder der Seite im Dialog einstellen.",
          "Im Abschnitt {i} finden Sie weitere Hinweise zu den Vorlagen und Formaten."]
ENGLISH = ["Chapter {i} explains how to set the margins of the page in the dialog.",
           "Section {i} contains further notes on the templates and formats."]
# page3 hashes to test and page4 to valid: the held-out splits are non-empty without any fallback,
# so the split of every help page is decided by its path alone, identically in both languages.
PAGES = range(8)


def _page(lang: str, i: int, sentences: list[str]) -> str:
    paras = "\n".join(f'<p id="par_id{i}0{j}" class="paragraph">{s.format(i=i)}</p>' for j, s in enumerate(sentences))
    return (f'<html lang="{lang}"><head><meta charset="utf-8"><script>var x = 1;</script></head><body>'
            f'<div id="DisplayArea"><h1 id="hd_id{i}">{sentences[0].format(i=i)[:40]}</h1>{paras}</div></body></html>')


def make_trees(root: Path) -> dict[str, Path]:
    """Unpacked fixture packages: help in de and en-US (same files, same ids), a man page, fortunes."""
    trees = {}
    for pkg, subdir, fixture, sentences in (("libreoffice-help-de", "de", "help_de.html", GERMAN),
                                            ("libreoffice-help-en-us", "en-US", "help_en.html", ENGLISH)):
        text = root / pkg / "usr/share/libreoffice/help" / subdir / "text"
        (text / "shared").mkdir(parents=True)
        shutil.copy(FIX / fixture, text / "shared" / "margins.html")
        for i in PAGES:
            (text / "shared" / f"page{i}.html").write_text(_page(subdir, i, sentences), encoding="utf-8")
        trees[pkg] = root / pkg
    man1 = root / "manpages-de/usr/share/man/de/man1"
    man1.mkdir(parents=True)
    for name in ("beispiel.1", "link.1"):
        (man1 / f"{name}.gz").write_bytes(gzip.compress((FIX / name).read_bytes()))
    trees["manpages-de"] = root / "manpages-de"
    fort = root / "fortunes-de/usr/share/games/fortunes/de"
    fort.mkdir(parents=True)
    shutil.copy(FIX / "fortunes_de", fort / "sprueche")
    (fort / "sprueche.dat").write_bytes(b"\x00\x02index")
    trees["fortunes-de"] = root / "fortunes-de"
    return trees


DE_PACKAGES = (PackageSpec("libreoffice-help-de", "help", "de"),
               *((PackageSpec("manpages-de", "man", "de"),) if HAVE_GROFF else ()),
               PackageSpec("fortunes-de", "fortune"))
SPECS = {"de": LanguageSpec("de", DE_PACKAGES, langid="de"),
         "en": LanguageSpec("en", (PackageSpec("libreoffice-help-en-us", "help", "en-US"),), langid=None)}


@dataclass(frozen=True)
class NoFetchSource(TreeSource):
    """Knows versions but must never unpack: proves that a run works from the caches."""

    def unpack(self, name, version, dest):
        raise AssertionError(f"{name} was fetched again although it is cached")


@dataclass(frozen=True)
class FailingSource(TreeSource):
    """Like TreeSource, but the download of one package fails."""

    fail: str = ""

    def unpack(self, name, version, dest):
        if name == self.fail:
            raise PackageError(f"{name} {version}: download failed (simulated). Retry by hand with "
                               f"`apt-get download {name}={version}`")
        super().unpack(name, version, dest)


def read_records(out: Path, lang: str) -> dict[str, list[dict]]:
    return {s: [json.loads(line) for line in (out / lang / f"{s}.jsonl").read_text(encoding="utf-8").splitlines()]
            for s in SPLITS}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    trees = make_trees(root / "pkgs")
    out = root / "out"
    result = build_corpora(out, ["de", "en"], jobs=1, source=TreeSource(trees), languages=SPECS)
    return out, trees, result


def _copy(built, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(built[0], out, symlinks=True)
    return out


def test_outputs_are_one_paragraph_per_line_with_matching_jsonl(built):
    out, _, result = built
    assert not result.skipped and result.built == ["de", "en"]
    for lang in ("de", "en"):
        for split, records in read_records(out, lang).items():
            assert records, f"{lang}/{split} is empty"
            lines = (out / lang / f"{split}.txt").read_text(encoding="utf-8").splitlines()
            assert lines == [r["text"] for r in records]
            for r in records:
                assert set(r) == {"text", "source", "doc", "key"} and r["source"] in {"help", "man", "fortune"}
                assert (r["key"] is not None) == (r["source"] == "help" and "#" in (r["key"] or ""))
                if r["key"]:
                    assert r["key"].startswith(r["doc"] + "#")
    de = [r for recs in read_records(out, "de").values() for r in recs]
    assert {r["source"] for r in de} == ({"help", "man", "fortune"} if HAVE_GROFF else {"help", "fortune"})


def test_cleaning_removes_english_fragments_duplicates(built):
    out = built[0]
    de = [r["text"] for recs in read_records(out, "de").values() for r in recs]
    assert len(de) == len(set(de))  # deduplicated across all splits
    assert not any("Click the Apply button" in t or "Never trust a computer" in t for t in de)
    assert "Neu" not in de and "Wer anderen eine Grube gräbt, fällt selbst hinein." in de
    if HAVE_GROFF:
        assert not any("never translated" in t for t in de)
        assert "Unterdrückt jede Ausgabe, auch die Fehlermeldungen des Programms." in de
    en = [r["text"] for recs in read_records(out, "en").values() for r in recs]
    assert "Click the Apply button to save the page style for all pages in the current document." in en


def test_split_by_document_and_same_document_same_split_across_languages(built):
    out = built[0]
    where: dict[str, dict[str, set]] = {}
    for lang in ("de", "en"):
        where[lang] = defaultdict(set)
        for split, records in read_records(out, lang).items():
            for r in records:
                where[lang][r["doc"]].add(split)
        assert all(len(s) == 1 for s in where[lang].values()), f"{lang}: a document in two splits"
    shared = set(where["de"]) & set(where["en"])
    assert len(shared) == len(PAGES) + 1
    assert all(where["de"][d] == where["en"][d] for d in shared)
    assert where["de"]["text/shared/page3.html"] == {"test"} and where["de"]["text/shared/page4.html"] == {"valid"}


def test_help_keys_align_paragraphs_across_languages(built):
    out = built[0]
    keyed = {lang: {r["key"]: r["text"] for recs in read_records(out, lang).values() for r in recs if r["key"]}
             for lang in ("de", "en")}
    key = "text/shared/margins.html#par_id3147762"
    assert keyed["de"][key] == "Drücken Sie Strg+Z, um die letzte Änderung rückgängig zu machen."
    assert keyed["en"][key] == "Press Ctrl+Z to undo the last change."
    assert len(set(keyed["de"]) & set(keyed["en"])) >= 2 * len(PAGES)


def test_manifest_counts_and_checksums(built):
    out = built[0]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["wall_time_s"] >= 0 and set(manifest["languages"]) == {"de", "en"}
    de = manifest["languages"]["de"]
    assert [p["name"] for p in de["packages"]] == [p.name for p in DE_PACKAGES]
    assert all(p["version"] == "0-test" and p["documents"] > 0 for p in de["packages"])
    assert de["dropped"]["english"] >= 1 and de["dropped"]["duplicate"] >= 1 and de["dropped"]["tiny"] >= 1
    for lang, entry in manifest["languages"].items():
        assert entry["unit"] == "words"
        for split in SPLITS:
            records = read_records(out, lang)[split]
            for name in (f"{split}.txt", f"{split}.jsonl"):
                info = entry["files"][name]
                assert info["sha256"] == sha256_file(out / lang / name)
                assert info["lines"] == len(records)
                assert info["documents"] == len({r["doc"] for r in records})
                assert info["words"] == sum(len(r["text"].split()) for r in records)
    assert json.loads((out / "de" / "meta.json").read_text()) == de
    report = (out / "report.md").read_text()
    assert "| de | " in report and "| en | " in report and "0-test" in report
    d = de["dropped"]
    assert f"{d['tiny']:,} / {d['english']:,} / {d['duplicate']:,} |" in report


def test_second_run_verifies_and_skips_quickly(built, caplog):
    out = built[0]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    with caplog.at_level(logging.INFO):
        t0 = time.monotonic()
        result = build_corpora(out, ["de", "en"], jobs=1, source=NoFetchSource(built[1]), languages=SPECS)
        assert time.monotonic() - t0 < 2
    assert result.skipped and "skipped" in caplog.text
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def test_damaged_language_is_rebuilt_from_cache_identically(built, tmp_path):
    out = _copy(built, tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    with open(out / "de" / "valid.txt", "a", encoding="utf-8") as f:
        f.write("eine nachträglich angehängte Zeile\n")
    result = build_corpora(out, ["de", "en"], jobs=1, source=NoFetchSource(built[1]), languages=SPECS)
    assert not result.skipped and result.built == ["de"] and result.reused == ["en"]
    again = json.loads((out / "manifest.json").read_text())
    for lang in ("de", "en"):  # deterministic: the rebuilt files are byte-identical
        assert {n: f["sha256"] for n, f in again["languages"][lang]["files"].items()} == \
               {n: f["sha256"] for n, f in manifest["languages"][lang]["files"].items()}


def test_failed_download_leaves_no_complete_looking_output(built, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(PackageError) as err:
        build_corpora(out, ["de", "en"], jobs=1, source=FailingSource(built[1], fail="fortunes-de"), languages=SPECS)
    message = str(err.value)
    assert "fortunes-de" in message and "apt-get download fortunes-de=0-test" in message
    assert f"python -m mergedistill.demo.corpora --out {out} --langs de" in message
    assert not (out / "manifest.json").exists() and not (out / "de").exists()
    assert not list(out.glob(".*.partial")) and not list((out / ".cache").glob("unpack/*"))
    # The retry reuses the finished language (en) and the cached extractions.
    result = build_corpora(out, ["de", "en"], jobs=1, source=TreeSource(built[1]), languages=SPECS)
    assert result.built == ["de"] and result.reused == ["en"] and (out / "manifest.json").exists()


def test_missing_package_is_reported_before_any_work(built, tmp_path):
    trees = {k: v for k, v in built[1].items() if k != "fortunes-de"}
    out = tmp_path / "out"
    with pytest.raises(PackageError, match="fortunes-de: no such package"):
        build_corpora(out, ["de"], jobs=1, source=TreeSource(trees), languages=SPECS)
    assert not (out / "de").exists() and not (out / ".cache" / "text").exists()


def test_crash_while_writing_keeps_the_old_folder_and_no_manifest(built, tmp_path, monkeypatch):
    out = _copy(built, tmp_path)
    old = {p.name: sha256_file(p) for p in (out / "de").iterdir()}
    real = language.write_splits

    def crash(folder, *args):
        real(folder, *args)
        (folder / "train.txt").write_text("halb geschrieben\n")
        raise RuntimeError("simulated crash while writing")

    monkeypatch.setattr(language, "write_splits", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_corpora(out, ["de"], jobs=1, source=NoFetchSource(built[1]), languages=SPECS, force=True)
    assert not (out / "manifest.json").exists()  # the corpus no longer claims to be complete
    assert {p.name: sha256_file(p) for p in (out / "de").iterdir()} == old and not list(out.glob(".*.partial"))
    monkeypatch.setattr(language, "write_splits", real)
    result = build_corpora(out, ["de", "en"], jobs=1, source=NoFetchSource(built[1]), languages=SPECS)
    assert result.reused == ["de", "en"] and not result.built and (out / "manifest.json").exists()


def test_process_pool_gives_the_same_bytes(built, tmp_path):
    out = tmp_path / "out"
    build_corpora(out, ["en"], jobs=2, source=TreeSource(built[1]), languages=SPECS)
    for name in ("train.txt", "valid.jsonl", "test.jsonl"):
        assert sha256_file(out / "en" / name) == sha256_file(built[0] / "en" / name)


def test_cli_builds_skips_and_exits_2_naming_the_missing_package(built, tmp_path, caplog, capsys):
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        assert main(["--out", str(out), "--langs", "en", "-j", "1"], source=TreeSource(built[1])) == 0
        assert (out / "en" / "train.jsonl").is_file() and (out / "manifest.json").is_file()
        assert main(["--out", str(out), "--langs", "en", "-j", "1"], source=NoFetchSource(built[1])) == 0
    assert "skipped" in caplog.text
    # The real recipe for de also wants manpages-de-dev, which the fixture trees lack.
    assert main(["--out", str(out), "--langs", "de", "-j", "1"], source=TreeSource(built[1])) == 2
    err = capsys.readouterr().err
    assert ("manpages-de-dev" in err and "--langs de" in err) if HAVE_GROFF else "groff-base" in err
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--langs" in capsys.readouterr().out


def test_missing_groff_says_how_to_install_it(built, tmp_path, monkeypatch):
    from mergedistill.demo.corpora import extract

    monkeypatch.setattr(extract.shutil, "which", lambda name: None)
    specs = {"de": LanguageSpec("de", (PackageSpec("manpages-de", "man", "de"),), langid="de")}
    with pytest.raises(UserError, match=r"groff.*apt-get install groff-base"):
        build_corpora(tmp_path / "out", ["de"], jobs=1, source=TreeSource(built[1]), languages=specs)
    assert not (tmp_path / "out" / "de").exists()


def test_unknown_language_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="unknown language.*xx"):
        build_corpora(tmp_path / "out", ["xx"], languages=SPECS)
