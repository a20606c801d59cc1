# The two commands: `make demo` and `make test`. Both create .venv and install first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	PREFECT_HOME=$${PREFECT_HOME:-$(CURDIR)/.prefect} $(BIN)/curate run

test: $(STAMP)
	PREFECT_HOME=$$(mktemp -d) $(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-slow: $(STAMP)
	PREFECT_HOME=$$(mktemp -d) $(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/ingest_index.py

.PHONY: install demo test test-slow bench

fashion-mnist: $(STAMP)
	$(BIN)/curate ingest idx --src ../shared/datasets/fashion-mnist --out data/fashion-mnist --name fashion-mnist
.PHONY: fashion-mnist
