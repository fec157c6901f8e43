# Two commands on a fresh clone: `make demo` and `make test`. Each sets up .venv itself.
PYTHON_BOOTSTRAP ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
TENSORRT_RTX := $(VENV)/.tensorrt-rtx

.PHONY: demo test test-gpu gpu-check benchmark-cpu benchmark-gpu clean

$(INSTALLED): pyproject.toml constraints.txt
	$(PYTHON_BOOTSTRAP) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet pip==25.3
	$(PYTHON) -m pip install --quiet --constraint constraints.txt --editable ".[test]"
	touch $@

demo: $(INSTALLED)
	$(PYTHON) -m demo

# The tests also build engines with TensorRT-RTX (no GPU needed) and compile the kernels with NVRTC.
# TensorRT-RTX's parser loads libtensorrt_rtx.so, which its wheel lacks: link it (kernels/tensorrt_library.py).
$(TENSORRT_RTX): $(INSTALLED)
	$(PYTHON) -m pip install --quiet --constraint constraints.txt --editable ".[tensorrt-rtx,nvrtc]"
	$(PYTHON) -m kernels.tensorrt_library --link-rtx-parser-library
	touch $@

# The kernels compile once, inside pytest (nvcc and NVRTC); the register table prints at the end.
test: $(TENSORRT_RTX)
	$(PYTHON) -m pytest -q -rs

# On the GPU machine (system python3 with CUDA, PyTorch, CuPy; no venv there). `gpu-check` is the one
# command for a short lease: preflight, GPU tests, compute-sanitizer memcheck and racecheck, the kernel
# benchmark, then its torch.compile rows; each step under its own limit, all within 9 minutes, each
# log in $OUT as it ends. Without a GPU it stops at the preflight and says why.
gpu-check:
	PYTHONPATH=. PYTHONUNBUFFERED=1 python3 -m kernels.gpu_check --out $${OUT:-gpu_check_out}

test-gpu:
	PYTHONPATH=. PYTHONUNBUFFERED=1 python3 -m pytest --noconftest -p no:cacheprovider -m gpu -rs tests/test_kernels_gpu.py

benchmark-gpu:
	PYTHONPATH=. PYTHONUNBUFFERED=1 python3 benchmarks/gpu_kernels.py --out $${OUT:-bench_out} --skip-compile
	PYTHONPATH=. PYTHONUNBUFFERED=1 python3 benchmarks/gpu_kernels.py --out $${OUT:-bench_out}/compile --only-compile

benchmark-cpu: $(INSTALLED)
	$(PYTHON) -m benchmarks.cpu_serving

clean:
	rm -rf triton_repo/*/ demo_output .pytest_cache gpu_check_out bench_out
