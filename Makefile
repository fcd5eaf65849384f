# threadloom's entry points. `make demo` and `make test` do all set-up on a fresh Debian 12
# machine: scripts/bootstrap.sh installs the apt packages, the free-threaded interpreter and the
# pinned PyPI packages (requirements/pins.txt; all cached in ~/.cache/threadloom, a no-op once
# done) and makes the venvs build/venv (free-threaded) and build/venv-gil (the GIL baseline);
# `make build` installs this checkout into them with pip, as a user would (`pip install .`).
#
#   make demo       `python -m threadloom info`, a multi-threaded example, then the main job
#                   (examples/main_job.py, on the GPUs, else on sim:8, and it says which):
#                   uninterrupted, preempted, resumed to the same weights
#   make test       C tests (ctest), Python tests (pytest on the free-threaded venv), and the
#                   torch tests (tests/torch: threadloom next to torch, on both venvs)
#   make test-asan  the C core and its tests under AddressSanitizer + UBSan
#   make test-tsan  the C core and its tests under ThreadSanitizer
#   make gpu-test   only the GPU tests (they skip, saying why, without a GPU); on a GPU machine
#                   lent for minutes: scripts/gpu-check.sh (README, "Checking on a GPU")
#   make bench      the benchmarks this machine can run, and their report (Markdown + SVG plots),
#                   into bench/results/<machine>/ (BENCH_ARGS=--quick: a check in seconds)
#   make clean      remove the build directories and venvs (the cache stays)
#
# PYTHON=/path/to/python3.14t uses an existing free-threaded interpreter instead of building one;
# GIL_PYTHON=/path/to/python3 another baseline than /usr/bin/python3.

SHELL := /bin/bash
BUILD ?= build
JOBS ?= $(shell nproc)
ENVFILE := build/bootstrap.env
# Read when a recipe runs, i.e. after the bootstrap has written the file.
PY = $(shell sed -n 's/^PYTHON := //p' $(ENVFILE))
GIL_PY = $(shell sed -n 's/^GIL_PYTHON := //p' $(ENVFILE))
CTEST = ctest --output-on-failure -j $(JOBS)
# `pip install .` of this checkout into the venv of $(1), CMake's build directory kept in $(2)
# (a rebuild is incremental): not editable, so the tests import the installed package; no build
# isolation, as the venv already has the pinned scikit-build-core; with the C tests, the C
# benchmarks and the test extension (TL_BUILD_TESTS), and debug info. A build directory that
# plain CMake configured (before pip built it) is configured afresh.
define pip_install
	@grep -qs '^SKBUILD' $(2)/CMakeCache.txt || rm -rf $(2)/CMakeCache.txt $(2)/CMakeFiles
	@CMAKE_BUILD_PARALLEL_LEVEL=$(JOBS) $(1) -m pip install --no-deps --no-build-isolation \
	  --disable-pip-version-check --no-input --quiet --force-reinstall --config-settings=build-dir=$(2) \
	  --config-settings=cmake.build-type=RelWithDebInfo --config-settings=cmake.define.TL_BUILD_TESTS=ON $(CURDIR)
endef

.PHONY: all bootstrap build build-gil demo test test-c test-py test-torch test-asan test-tsan gpu-test bench clean

all: build

bootstrap:
	@bash scripts/bootstrap.sh

build: bootstrap
	$(call pip_install,$(PY),$(BUILD))

# threadloom for the GIL baseline (build/venv-gil: its threads take turns): the extension and
# `python -m threadloom`, no launcher.
build-gil: bootstrap
	$(call pip_install,$(GIL_PY),build-gil)

demo: build
	@$(PY) -m threadloom info
	@echo
	@$(PY) examples/free_threads.py
	@echo
	@rm -rf $(BUILD)/demo
	@echo "== the main job (examples/main_job.py): a driver thread per device (the GPUs, else 8 simulated ones), DataLoader(device=) loader threads, allreduce on the devices, async checkpoints of device state"
	@$(PY) examples/main_job.py --ckpt-dir $(BUILD)/demo/reference
	@echo
	@echo "== the same job, preempted: SIGUSR2 after step 350 (it checkpoints and exits with status 75)"
	@$(PY) examples/main_job.py --ckpt-dir $(BUILD)/demo/job --preempt-at 350; test $$? -eq 75
	@echo
	@echo "== the same command again: resumes from the newest complete checkpoint, ends with the same weights"
	@$(PY) examples/main_job.py --ckpt-dir $(BUILD)/demo/job --check-against $(BUILD)/demo/reference

# (TL_BUILT: the sub-make's test-torch does not install threadloom again)
test: build build-gil
	@$(MAKE) --no-print-directory TL_BUILT=1 test-c test-py test-torch

test-c:
	@cd $(BUILD) && $(CTEST)

# -P: the current directory is not put on sys.path, so only the installed threadloom imports
# (tests/python/conftest.py also stops the run if threadloom came from the sources).
test-py:
	@$(PY) -P -m pytest tests/python -q -rfEs

# threadloom next to torch in one interpreter: the same batches as torch's DataLoader, torch
# tensors through the Checkpointer, the torch example; on the free-threaded venv (torch's cp313t
# wheel) and on the GIL baseline, where torch's DataLoader with worker processes is at home.
# The venvs have the pinned packages (THREADLOOM_PINNED=1): a torch (or safetensors, on the GIL
# baseline) that does not import there is an error, not a skip.
test-torch: $(if $(TL_BUILT),,build build-gil)
	@echo "== tests/torch on the free-threaded venv ($(PY))"
	@THREADLOOM_PINNED=1 $(PY) -P -m pytest tests/torch -q -rfEs -p no:cacheprovider
	@echo "== tests/torch on the GIL baseline ($(GIL_PY))"
	@THREADLOOM_PINNED=1 $(GIL_PY) -P -m pytest tests/torch -q -rfEs -p no:cacheprovider

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
	rm -rf build build-gil build-torch build-asan build-tsan python/threadloom/_core*.so
