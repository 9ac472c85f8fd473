# Everything a fresh machine needs: `make demo` and `make test` create the virtualenv first.
PYTHON ?= python3
VENV ?= .venv
# Install torch first, pinned, so pip never resolves a multi-GB CUDA build on CPU machines.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
FAMILY ?= examples/family

.PHONY: install test demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

test: install
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/python examples/build_family.py --out $(FAMILY)
	bash examples/demo.sh $(FAMILY)

clean:
	rm -rf $(VENV) $(FAMILY) .pytest_cache
