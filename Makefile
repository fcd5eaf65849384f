# threadloom's entry points. `make demo` and `make test` do all set-up on a fresh Debian 12
# machine: scripts/bootstrap.sh installs the apt packages and the free-threaded interpreter
# (cached in ~/.cache/threadloom; a no-op once done), then CMake builds into build/.
#
#   make demo       `python -m threadloom info`, a multi-threaded example, then the main job
#                   (examples/main_job.py, on the GPUs, else on sim:8, and it says which):
#                   uninterrupted, preempted, resumed to the same weights
#   make test       C tests (ctest), Python tests (pytest on the free-threaded interpreter), and
#                   the torch tests (tests/torch: threadloom next to torch, on TORCH_PYTHON)
#   make test-asan  the C core and its tests under AddressSanitizer + UBSan
#   make test-tsan  the C core and its tests under ThreadSanitizer
#   make gpu-test   only the GPU tests (they skip, saying why, without a GPU); on a GPU machine
#                   lent for minutes: scripts/gpu-check.sh (README, "Checking on a GPU")
#   make bench      the benchmarks this machine can run, and their report (Markdown + SVG plots),
#                   into bench/results/<machine>/ (BENCH_ARGS=--quick: a check in seconds)
#   make clean      remove the build directories (the interpreter cache stays)
#
# PYTHON=/path/to/python3.14t uses an existing free-threaded interpreter instead of building one.

SHELL := /bin/bash
BUILD ?= build
JOBS ?= $(shell nproc)
ENVFILE := build/bootstrap.env
# Read when a recipe runs, i.e. after the bootstrap has written the file.
PY = $(shell sed -n 's/^PYTHON := //p' $(ENVFILE))
PYTEST_PATH = $(shell sed -n 's/^PYTEST_PATH := //p' $(ENVFILE))
TORCH_PY = $(shell sed -n 's/^TORCH_PYTHON := //p' $(ENVFILE))
PYENV = PYTHONPATH=$(CURDIR)/python:$(PYTEST_PATH)
CTEST = ctest --output-on-failure -j $(JOBS)

.PHONY: all bootstrap build build-torch demo test test-c test-py test-torch test-asan test-tsan gpu-test bench clean

all: build

bootstrap:
	@bash scripts/bootstrap.sh

build: bootstrap
	@cmake -S . -B $(BUILD) -DTL_PYTHON=$(PY) >/dev/null
	@cmake --build $(BUILD) -j $(JOBS)

demo: build
	@cd $(CURDIR) && $(PYENV) $(PY) -m threadloom info
	@echo
	@$(PYENV) $(PY) examples/free_threads.py
	@echo
	@rm -rf $(BUILD)/demo
	@echo "== the main job (examples/main_job.py): a driver thread per device (the GPUs, else 8 simulated ones), loader and feeder threads, allreduce on the devices, async checkpoints"
	@$(PYENV) $(PY) examples/main_job.py --ckpt-dir $(BUILD)/demo/reference
	@echo
	@echo "== the same job, preempted: SIGUSR2 after step 350 (it checkpoints and exits with status 75)"
	@$(PYENV) $(PY) examples/main_job.py --ckpt-dir $(BUILD)/demo/job --preempt-at 350; test $$? -eq 75
	@echo
	@echo "== the same command again: resumes from the newest complete checkpoint, ends with the same weights"
	@$(PYENV) $(PY) examples/main_job.py --ckpt-dir $(BUILD)/demo/job --check-against $(BUILD)/demo/reference

# The extension for the Python that has torch (a GIL build: its threads take turns). Only the
# module is built; it lands next to the free-threaded one (another EXT_SUFFIX).
build-torch: bootstrap
	@cmake -S . -B build-torch -DTL_PYTHON=$(TORCH_PY) -DTL_PYTHON_GIL_OK=ON >/dev/null
	@cmake --build build-torch -j $(JOBS) --target tl_core

test: build build-torch
	@$(MAKE) --no-print-directory test-c test-py test-torch

test-c:
	@cd $(BUILD) && $(CTEST)

test-py:
	@$(PYENV) $(PY) -m pytest tests/python -q -rfEs

# threadloom next to torch in one interpreter: the same batches as torch's DataLoader, torch
# tensors through the Checkpointer, the torch example.
test-torch: build-torch
	@$(PYENV) $(TORCH_PY) -m pytest tests/torch -q -rfEs -p no:cacheprovider

# Sanitizer builds: the C library and C tests only (the interpreter is not instrumented).
test-asan: bootstrap
	@cmake -S . -B build-asan -DTL_ASAN=ON -DTL_UBSAN=ON -DTL_WITH_PYTHON=OFF >/dev/null
	@cmake --build build-asan -j $(JOBS)
	@cd build-asan && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 $(CTEST)

test-tsan: bootstrap
	@cmake -S . -B build-tsan -DTL_TSAN=ON -DTL_WITH_PYTHON=OFF >/dev/null
	@cmake --build build-tsan -j $(JOBS)
	@cd build-tsan && TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1:suppressions=$(CURDIR)/tests/tsan.supp $(CTEST)

# The GPU test suite (the C tests gpu_* and the Python tests marked gpu: the cuda half of the
# suite CI runs on sim), as scripts/gpu-check.sh runs it on a GPU machine.
gpu-test: build
	@bash scripts/gpu-check.sh --tests

bench: build
	@bash bench/run.sh $(BENCH_ARGS) $(PY)

clean:
	rm -rf build build-torch build-asan build-tsan python/threadloom/_core*.so
