# Set-up and entry points. `make test` and `make demo` work on a fresh machine:
# they create .venv, install CPU torch only where no torch is importable
# (GPU users bring their own), then the package with its test extras.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_CPU := torch==2.13.0

.PHONY: install test bench demo clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "torch found: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else \
		echo "no torch importable: installing the CPU build $(TORCH_CPU)"; \
		$(PY) -m pip install -q $(TORCH_CPU); \
	fi
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# the test files spread over the CPU cores (pytest-xdist), each file kept in one worker
# so that its module-wide fixtures (the AOT compilation, the exported networks) run once
test: $(STAMP)
	$(PY) -m pytest -q -n auto --dist loadfile

bench: $(STAMP)
	$(PY) -m pytest bench --benchmark-only -q

demo: $(STAMP)
	$(PY) -m rmi_triton.demo

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
