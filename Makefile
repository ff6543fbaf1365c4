# Two entry points, each idempotent on a fresh machine:
#   make train   set up what training needs, then train SimpleNet on Fashion-MNIST
#                (python scripts/train.py): torch, the package, Opacus (--preset private)
#   make test    add the test tools and the interop extras (JAX/Flax/Optax/Orbax, ONNX,
#                dp-accounting, torchdata), then run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Pinned to the release on this machine's disk; override for another platform.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# A second `make train` continues the run in output/simplenet instead of refusing it.
TRAIN_ARGS ?= --resume auto

.PHONY: setup setup-train data train test test-orders lint bench
setup-train: $(VENV)/.installed-train data
setup: $(VENV)/.installed-test data

$(VENV)/.installed-train: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[privacy]'
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed-train
	$(BIN)/python -m pip install -q -e '.[dev,jax,onnx,privacy]'
	touch $@

data:
	@sh scripts/get_data.sh

train: setup-train
	$(BIN)/python scripts/train.py $(TRAIN_ARGS) $(ARGS)

# Two workers (pytest-xdist) that steal tests from each other, so one long file cannot leave a
# core idle; each computes on one thread (tests/conftest.py). TEST_JOBS=0: one process.
TEST_JOBS ?= 2
test: setup
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist worksteal $(ARGS)

# The cross-path tests (two computations equal in exact arithmetic, marked cross_path) again at
# two compute threads and with ATEN_CPU_CAPABILITY=default: each sums in another order.
test-orders: setup
	PYTHON=$(BIN)/python bash scripts/check_summation_order.sh -n $(TEST_JOBS)

lint: setup
	$(BIN)/ruff check fashion_func scripts tests

bench: setup
	$(BIN)/python scripts/bench.py $(ARGS)
