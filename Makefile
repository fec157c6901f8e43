# Two commands on a fresh clone: `make demo` and `make test`. Each sets up .venv itself.
PYTHON_BOOTSTRAP ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: demo test test-gpu benchmark-cpu clean

$(INSTALLED): pyproject.toml constraints.txt
	$(PYTHON_BOOTSTRAP) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet pip==25.3
	$(PYTHON) -m pip install --quiet --constraint constraints.txt --editable ".[test]"
	touch $@

demo: $(INSTALLED)
	$(PYTHON) -m client.demo

test: $(INSTALLED)
	$(PYTHON) -m pytest -q -rs

benchmark-cpu: $(INSTALLED)
	$(PYTHON) -m benchmarks.cpu_serving

clean:
	rm -rf triton_repo/*/ demo_output .pytest_cache
