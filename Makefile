# The two commands of the README. Each installs what it needs first (scripts/setup.sh).
PY ?= python3

.PHONY: setup bench test asan

setup:
	PYTHON=$(PY) bash scripts/setup.sh

# The main job: fastgpt vs torch eager vs torch.compile on this machine, as a ratio table.
bench: setup
	$(PY) -m fastgpt bench

# Lint, every test, and every benchmark once with timing off (so none can rot). Two pytest runs:
# tests/ and benchmarks/ each have their own conftest.
test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest tests -q -p no:cacheprovider
	$(PY) -m pytest benchmarks --benchmark-disable -q -p no:cacheprovider

# The C++ kernels under AddressSanitizer (a separate build in build/asan).
asan: setup
	bash scripts/asan.sh
