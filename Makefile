# Set-up and entry points. `make test` and `make demo` work on a fresh machine:
# they create .venv, install torch only where none is importable (GPU users bring
# their own), then the package with its test extras. A torch that $(PYTHON) imports
# (a system or conda install) is seen from .venv, which then takes that
# interpreter's packages too (not a torch in another virtualenv: a venv made from
# a venv's python sees the base interpreter's packages); a torch installed into
# .venv before `make` is kept.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# the registry of these project machines holds torch 2.13.0's CPU build
TORCH := torch==2.13.0

.PHONY: install test bench demo clean

$(PY):
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "$(PYTHON) has torch: .venv made with --system-site-packages"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
	fi

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "torch found: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else \
		echo "no torch importable: installing $(TORCH)"; \
		$(PY) -m pip install -q $(TORCH); \
	fi
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# the tests spread over the CPU cores (pytest-xdist), one by one but for the files with module-wide
# fixtures (the AOT compilation, the exported networks, the tiny runs), each kept whole in one
# worker so that its fixtures run once (tests/conftest.py: WHOLE_FILES and the scheduler)
test: $(STAMP)
	$(PY) -m pytest -q -n auto

bench: $(STAMP)
	$(PY) -m pytest bench --benchmark-only -q

demo: $(STAMP)
	$(PY) -m rmi_triton.demo

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
