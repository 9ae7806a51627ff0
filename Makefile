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

# Framework tests (tests/frameworks/, docs/frameworks.md), each framework in a venv of its own:
# .venv-lightning beside the CPU torch, .venv-timm with the CUDA torch that torchvision needs.
# FUSED_LR_CUDA=0 and a non-editable install: these venvs never build the CUDA extension (minutes)
# nor remove the one that .venv's editable install left in fused_lr/. The tests import fused_lr
# from this tree (PYTHONPATH), so they always test the current sources.
LIGHTNING_BIN := .venv-lightning/bin
TIMM_BIN := .venv-timm/bin

$(LIGHTNING_BIN)/pytest: pyproject.toml setup.py constraints-cpu.txt
	python3 -m venv .venv-lightning
	FUSED_LR_CUDA=0 $(LIGHTNING_BIN)/pip install -q -c constraints-cpu.txt ".[test,lightning]"
	touch $@

$(TIMM_BIN)/pytest: pyproject.toml setup.py constraints-timm.txt
	python3 -m venv .venv-timm
	FUSED_LR_CUDA=0 $(TIMM_BIN)/pip install -q -c constraints-timm.txt ".[test,timm]"
	touch $@

.PHONY: test-frameworks test-lightning test-timm
test-lightning: $(LIGHTNING_BIN)/pytest
	PYTHONPATH=$(CURDIR) $(LIGHTNING_BIN)/pytest tests/frameworks/test_lightning.py

test-timm: $(TIMM_BIN)/pytest
	PYTHONPATH=$(CURDIR) $(TIMM_BIN)/pytest tests/frameworks/test_timm.py

test-frameworks: test-lightning test-timm
