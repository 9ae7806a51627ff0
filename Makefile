# The two quick-start commands: `make demo` and `make test`. Each sets up .venv (CPU torch from
# constraints-cpu.txt, fused_lr editable, the CUDA extension compiled where nvcc is found, the
# compiled metadata helper fused_lr._meta against that torch). The build requirements and torch go
# in first and fused_lr builds without pip's isolation: an isolated build has no torch, and
# fused_lr._meta needs the very torch it will run with.
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/fused-lr: pyproject.toml setup.py constraints-cpu.txt CMakeLists.txt fused_lr/core/layout.py $(wildcard csrc/*.cu csrc/*.h csrc/*.cpp csrc/meta/*.cpp)
	python3 -m venv $(VENV)
	$(BIN)/pip install -q -c constraints-cpu.txt "setuptools>=64" wheel "pybind11>=2.12" "cmake>=3.18" torch
	$(BIN)/pip install -q -c constraints-cpu.txt --no-build-isolation -e ".[demo,test]"
	touch $@

.PHONY: demo test bench bench-fsdp gpu-check
demo: $(BIN)/fused-lr
	$(BIN)/fused-lr demo

test: $(BIN)/fused-lr
	$(BIN)/ruff check .
	$(BIN)/pytest

# The CPU step and host-cost benchmarks under pytest-benchmark (= `pytest --benchmark-only`); the
# same functions as `fused-lr bench` (fused_lr/tools/bench/, benchmarks/README.md)
bench: $(BIN)/fused-lr
	$(BIN)/pytest benchmarks/ --benchmark-only

# FSDP2 on 2 gloo CPU ranks: the Numba step on the local shards against a plain model of their
# size (fused-lr bench fsdp --help; benchmarks/README.md, "FSDP2 (numba, 2 gloo ranks)")
bench-fsdp: $(BIN)/fused-lr
	$(BIN)/fused-lr bench fsdp --views

# GPU machines only, with no .venv: their own python3 (a CUDA torch) runs the package from this
# checkout, builds the extension offline and runs every GPU check, writing everything to
# GPU_CHECK_OUT (python3 -m fused_lr.tools.bench gpu-check --help, or --list for the items).
GPU_PYTHON ?= python3
GPU_CHECK_OUT ?= out/gpu-check
gpu-check:
	$(GPU_PYTHON) -m fused_lr.tools.bench gpu-check --out $(GPU_CHECK_OUT)

# Framework tests (tests/frameworks/, docs/frameworks.md). Lightning is in the test extra, so
# `make test` runs its tests; timm needs the CUDA build of torch (for torchvision), so it gets a
# venv of its own, .venv-timm (FUSED_LR_CUDA=0, non-editable: it never builds the CUDA extension nor
# removes the one .venv's editable install left in fused_lr/; the tests import this tree).
TIMM_BIN := .venv-timm/bin

$(TIMM_BIN)/pytest: pyproject.toml setup.py constraints-timm.txt
	python3 -m venv .venv-timm
	FUSED_LR_CUDA=0 $(TIMM_BIN)/pip install -q -c constraints-timm.txt ".[test,timm]"
	touch $@

.PHONY: test-full test-frameworks test-timm
# everything, the slow tests too (a fresh venv and install)
test-full: $(BIN)/fused-lr
	$(BIN)/ruff check .
	$(BIN)/pytest -m ""

test-timm: $(TIMM_BIN)/pytest
	PYTHONPATH=$(CURDIR) $(TIMM_BIN)/pytest tests/frameworks/test_timm.py

test-frameworks: $(BIN)/fused-lr test-timm
	$(BIN)/pytest tests/frameworks/
