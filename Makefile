# The two commands of the README. Each installs what it needs first (scripts/setup.sh).
PY ?= python3

.PHONY: setup bench test asan bench-save bench-compare

setup:
	PYTHON=$(PY) bash scripts/setup.sh

# The main job: fastgpt vs torch eager vs torch.compile on this machine, as a ratio table.
bench: setup
	$(PY) -m fastgpt bench

# History: bench-save runs the suites and saves the run as JSON under .benchmarks/ (pytest-
# benchmark's autosave, named by run number, commit and time); bench-compare runs them again and
# fails if any case is slower than the latest saved run by more than BENCH_FAIL. It does not save:
# a regressed run must not become the next baseline; bench-save once the numbers are accepted.
# min, not mean: on a shared machine other jobs stretch the mean of a few rounds far more than the
# fastest round. BENCH picks the suites (and -k selects cases).
BENCH ?= benchmarks/test_bench_layer_norm.py benchmarks/test_bench_gelu.py
BENCH_FAIL ?= min:10%
BENCH_ARGS = --benchmark-only --benchmark-columns=min,mean,stddev -q -p no:cacheprovider

bench-save: setup
	$(PY) -m pytest $(BENCH) $(BENCH_ARGS) --benchmark-autosave

bench-compare: setup
	$(PY) -m pytest $(BENCH) $(BENCH_ARGS) --benchmark-compare --benchmark-compare-fail=$(BENCH_FAIL)

# Lint, every test, and every benchmark once with timing off (so none can rot). Two pytest runs:
# tests/ and benchmarks/ each have their own conftest.
test: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest tests -q -p no:cacheprovider
	$(PY) -m pytest benchmarks --benchmark-disable -q -p no:cacheprovider

# The C++ kernels under AddressSanitizer (a separate build in build/asan).
asan: setup
	bash scripts/asan.sh
