# The two commands at the top of README.md. Both set the machine up first (idempotent).
PYTHON ?= python
export OMP_NUM_THREADS ?= 1

.PHONY: setup run test test-fast lint bench-suite

setup:
	@bash scripts/setup.sh

# The main job on the embedded default (see README).
run: setup
	@$(PYTHON) -m par_deploy demo

lint:
	@$(PYTHON) -m ruff check .
	@$(PYTHON) -m ruff format --check .

# Everything CI runs: lint, the fast suite, and the small real simulator / training / export tests.
test: setup lint
	@$(PYTHON) -m pytest -q -m "not benchmark" -p no:cacheprovider

# The fast default suite only (no simulator, no slow tests).
test-fast: lint
	@$(PYTHON) -m pytest -q

# The pytest-benchmark suite; results saved as JSON for comparing commits.
bench-suite: setup
	@$(PYTHON) -m pytest -q -m benchmark -p no:cacheprovider --benchmark-autosave --benchmark-storage=.benchmarks tests/bench
