# `make test` and `make demo` set everything up on a fresh machine (creating .venv if missing).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test demo bench lint clean

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

lint: $(STAMP)
	$(VENV)/bin/ruff check cgpyro tests benchmarks

clean:
	rm -rf $(VENV) report runs data/generated .pytest_cache
