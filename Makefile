# The two quick-start commands: `make demo` and `make test`. Each sets up .venv (CPU torch from
# constraints-cpu.txt, fused_lr editable, the CUDA extension compiled where nvcc is found).
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/fused-lr: pyproject.toml setup.py constraints-cpu.txt CMakeLists.txt $(wildcard csrc/*.cu csrc/*.h csrc/*.cpp)
	python3 -m venv $(VENV)
	$(BIN)/pip install -q -c constraints-cpu.txt -e ".[demo,test]"
	touch $@

.PHONY: demo test bench gpu-check
demo: $(BIN)/fused-lr
	$(BIN)/fused-lr demo

test: $(BIN)/fused-lr
	$(BIN)/ruff check .
	$(BIN)/pytest

bench: $(BIN)/fused-lr
	$(BIN)/pytest benchmarks/ --benchmark-only

# GPU machines only, with no .venv: their own python3 (a CUDA torch) builds the extension offline
# and runs every GPU check, writing everything to GPU_CHECK_OUT (scripts/gpu_check.py --help).
GPU_PYTHON ?= python3
GPU_CHECK_OUT ?= out/gpu-check
gpu-check:
	$(GPU_PYTHON) scripts/gpu_check.py --out $(GPU_CHECK_OUT)
