# Two commands on a fresh clone: `make demo` and `make test`. Each sets up .venv itself.
PYTHON_BOOTSTRAP ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: demo test test-gpu benchmark-cpu benchmark-gpu clean

$(INSTALLED): pyproject.toml constraints.txt
	$(PYTHON_BOOTSTRAP) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet pip==25.3
	$(PYTHON) -m pip install --quiet --constraint constraints.txt --editable ".[test]"
	touch $@

demo: $(INSTALLED)
	$(PYTHON) -m demo

test: $(INSTALLED)
	@if command -v nvcc >/dev/null; then $(PYTHON) -m kernels.compile_check; else echo "nvcc not found: kernel compile check skipped"; fi
	$(PYTHON) -m pytest -q -rs

# On the GPU machine (system python3 with CUDA, PyTorch, CuPy; no venv there).
test-gpu:
	PYTHONPATH=. PYTHONUNBUFFERED=1 python3 -m pytest -m gpu -rs tests/test_kernels_gpu.py

benchmark-gpu:
	PYTHONPATH=. PYTHONUNBUFFERED=1 python3 benchmarks/gpu_kernels.py --out $${OUT:-bench_out}

benchmark-cpu: $(INSTALLED)
	$(PYTHON) -m benchmarks.cpu_serving

clean:
	rm -rf triton_repo/*/ demo_output .pytest_cache
