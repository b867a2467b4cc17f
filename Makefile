# mergedistill: `make demo` runs the whole pipeline on the embedded default; `make test` runs the suite.
# Both set everything up on a fresh clone (a virtualenv in .venv; torch pinned to the CPU wheel).
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
MD := $(VENV)/bin/mergedistill
STAMP := $(VENV)/.installed
# pip prints one harmless warning per package about this machine's extra index; keep the log readable
PIPQ := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: setup test test-all battery demo corpora teachers vocab select ablate xmod extend compress bench bench-vocab bench-data bench-train bench-shard-hash bench-xmod bench-compress bench-loss bench-relations bench-softmax study clean-demo help

help:
	@echo "make demo      # everything, end to end, on the embedded default (real corpora, locally trained teachers)"
	@echo "make test      # the test suite (fast tests; make test-all adds the slow ones)"
	@echo "make corpora teachers vocab   # single stages of the demo"
	@echo "make xmod      # dense vs X-Mod student on the demo's six languages: runs/demo/archs/report.md"
	@echo "make extend    # add Italian to the demo student: full vs mini-model adaptation (runs/demo/extend/it/report.md)"
	@echo "make compress  # the demo student pruned, quantized and distilled smaller, per language: runs/demo/compress/report.md"
	@echo "make study     # the recipe study: each lever against the demo's recipe, then three seeds (runs/demo/sweep/<name>/report.md)"
	@echo "make bench     # benchmarks (ratios measured side by side)"
	@echo "make battery   # 124 bad inputs, full disks, read-only folders, kills and concurrent runs: a table of how each ends"

setup: $(STAMP)
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip $(PIPQ)
	# torch first, from the pinned CPU wheel: an unpinned torch would pull GBs of CUDA packages
	$(PY) -m pip install -q -c constraints.txt torch $(PIPQ)
	$(PY) -m pip install -q -c constraints.txt -e '.[test]' $(PIPQ)
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q -m "not slow"

test-all: setup
	$(PY) -m pytest -q

# every kind of bad input against every stage; prints a table and the totals (handled / tried)
battery: setup
	$(PY) tests/battery.py

# the languages configs/demo.yaml names (its six, and it for `make extend`); `python -m mergedistill.demo.corpora
# --out corpora --langs pl,en` adds the others it knows (a build keeps the languages already built)
DEMO_LANGS := de,fr,es,ru,ja,zh,it
corpora: setup
	$(PY) -m mergedistill.demo.corpora --out corpora --langs $(DEMO_LANGS)

teachers: corpora
	$(PY) -m mergedistill.demo.teachers_build --config configs/teachers.yaml --out teachers

vocab: teachers
	$(MD) vocab --config configs/demo.yaml

select: teachers
	$(MD) select --config configs/demo.yaml

# teacher-selection variants (configured routing, all-multi, selected), one table: runs/demo/ablate/report.md
ablate: select
	$(MD) ablate --config configs/demo.yaml

# the curse-of-multilinguality comparison: a dense and an X-Mod student of the same body, shards and steps
# (the dense one is the demo's own student), one table and plot: runs/demo/archs/report.md
xmod: teachers
	$(MD) ablate --config configs/demo.yaml --archs

# every stage of the demo run; each skips when its outputs are complete, so a rerun resumes
demo: teachers
	$(PY) -m mergedistill.demo.source_task --config configs/demo.yaml > /dev/null
	time $(MD) run --config configs/demo.yaml
	@echo "demo: corpora/report.md, teachers/report.md, vocab/demo/report.md, runs/demo/data/manifest.json, runs/demo/train/export/README.md, runs/demo/eval/report.md"

# the recipe study (README: "The recipe study"): each lever of the distillation recipe against the demo's
# configured recipe at the same steps (each lever switched back), then that recipe over three seeds; one table and plot per sweep in
# runs/demo/sweep/<name>/ (the variant equal to the demo's settings is the demo run itself; unchanged shards are reused)
study: demo
	$(MD) sweep --config configs/demo.yaml --sweep.name=lines --vary data.max_lines=12000 --vary teachers.e5.max_lines=2000
	$(MD) sweep --config configs/demo.yaml --sweep.name=softmax --vary train.softmax=all,language
	$(MD) sweep --config configs/demo.yaml --sweep.name=top-k --vary data.top_k=8,128
	$(MD) sweep --config configs/demo.yaml --sweep.name=lr --vary train.lr=0.001,0.003
	$(MD) sweep --config configs/demo.yaml --sweep.name=kd-target --vary train.kd_target=renormalised,exact
	$(MD) sweep --config configs/demo.yaml --sweep.name=seeds --sweep.seeds=[0,1,2] --vary train.alpha=0.5
	$(MD) sweep --config configs/demo.yaml --sweep.name=temperature --vary train.temperature=1,2
	$(MD) sweep --config configs/demo.yaml --sweep.name=unmasked --vary data.unmasked_kd_prob=0,0.15
	$(MD) sweep --config configs/demo.yaml --sweep.name=steps --vary train.max_steps=2400

# add Italian to the demo student (full vs the mini-model, side by side): runs/demo/extend/it/report.md
extend: demo
	$(MD) extend --config configs/demo.yaml --language it

# pruning, int8 and a smaller student, each evaluated per language against the demo student (after `make demo`)
compress: demo
	$(MD) compress --config configs/demo.yaml
	@echo "compress: runs/demo/compress/report.md (variants in runs/demo/compress/<variant>/)"

bench: bench-vocab bench-data bench-train bench-shard-hash bench-xmod bench-compress bench-loss bench-relations

bench-vocab: setup
	$(PY) benchmarks/bench_vocab.py

clean-demo:
	rm -rf vocab/demo runs/demo

bench-data: corpora
	$(PY) benchmarks/bench_data.py

bench-train: corpora
	$(PY) benchmarks/bench_train.py

bench-shard-hash: corpora
	$(PY) benchmarks/bench_shard_hash.py

bench-xmod: setup
	$(PY) benchmarks/bench_xmod.py

bench-compress: setup
	$(PY) benchmarks/bench_compress.py

bench-loss: setup
	$(PY) benchmarks/bench_loss.py

bench-relations: setup
	$(PY) benchmarks/bench_relations.py

# the demo student's step with train.softmax all vs language (top-8 and top-128 shards): after make demo (and make study)
bench-softmax: setup
	$(PY) benchmarks/bench_softmax.py
