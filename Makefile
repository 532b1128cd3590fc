# `make test` and `make demo` set everything up on a fresh machine (creating .venv if missing).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
NB_STAMP := $(VENV)/.notebook-installed

.PHONY: install test demo bench bench-matrix bench-curves bench-exclusion bench-peers \
        bench-scale bench-ddp bench-simulate bench-gpu lint clean notebook

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	MPLBACKEND=Agg $(PY) -m pytest -q

demo: $(STAMP)
	MPLBACKEND=Agg $(VENV)/bin/cgpyro reproduce --out report/

bench: $(STAMP)
	MPLBACKEND=Agg $(PY) benchmarks/run.py --out benchmarks/results.md

# Longer benchmarks, each rewriting its own table in benchmarks/ (times on 2 cores, one thread).
bench-matrix: $(STAMP)      # ~1.5 h: 9 cells x n = 1, 4, 64
	MPLBACKEND=Agg $(PY) benchmarks/matrix.py --jsonl benchmarks/matrix.jsonl --out benchmarks/matrix.md
bench-curves: $(STAMP)      # ~30 min per bin count
	MPLBACKEND=Agg $(PY) benchmarks/curves.py --bins 25 --out benchmarks/curves
bench-exclusion: $(STAMP)   # ~15 min (simulation cached in data/generated/)
	MPLBACKEND=Agg $(PY) benchmarks/bench_exclusion.py --out benchmarks/exclusion.md
bench-peers: $(STAMP)       # pysindy + pydmd (the `bench` extra)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,bench]'
	MPLBACKEND=Agg $(PY) benchmarks/bench_peers.py --write
bench-scale: $(STAMP)
	MPLBACKEND=Agg $(PY) benchmarks/bench_scale.py --sizes 64,1000,10000,100000 --out benchmarks/scale.md
bench-ddp: $(STAMP)         # ~8 min: cgpyro train --nproc 1 and 2 on 1,000 sequences
	MPLBACKEND=Agg $(PY) benchmarks/bench_ddp.py --out benchmarks/ddp.md
bench-simulate: $(STAMP)
	MPLBACKEND=Agg $(PY) benchmarks/bench_simulate.py --scale --write
bench-gpu: $(STAMP)         # on a CUDA machine: writes benchmarks/gpu.md naming the card
	benchmarks/gpu.sh

# JupyterLab + ipywidgets (the `notebook` extra) on the project's kernel; `make test` and
# `make demo` never install them. Extra flags: make notebook JUPYTER_ARGS=--no-browser
$(NB_STAMP): $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,notebook]'
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (cgpyro)" >/dev/null
	touch $(NB_STAMP)

notebook: $(NB_STAMP)
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks $(JUPYTER_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check cgpyro tests benchmarks

clean:
	rm -rf $(VENV) report runs data/generated .pytest_cache
