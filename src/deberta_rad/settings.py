"""Environment and secrets (pydantic-settings); knobs that shape results live in params.yaml instead."""

from __future__ import annotations

import shutil
import sys
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Read from the environment (prefix DEBERTA_RAD_) and an optional `.env` file."""

    model_config = SettingsConfigDict(env_prefix="DEBERTA_RAD_", env_file=".env", extra="ignore")

    # MLflow: the embedded default is a SQLite file in the repo; MLFLOW_TRACKING_URI overrides it.
    mlflow_tracking_uri: str = Field(default="sqlite:///mlflow.db", validation_alias="MLFLOW_TRACKING_URI")
    # A tracking server with accounts (`deberta-rad platform up`): MLflow's own variables, also read from
    # .env, never from params or logs.
    mlflow_tracking_username: str | None = Field(default=None, validation_alias="MLFLOW_TRACKING_USERNAME")
    mlflow_tracking_password: SecretStr | None = Field(default=None, validation_alias="MLFLOW_TRACKING_PASSWORD")
    mlflow_experiment: str = "deberta-rad"
    registered_model: str = "deberta-rad"

    # LLM teacher: any OpenAI-compatible endpoint. Reports are PHI, so sending them is opt-in.
    openai_base_url: str | None = Field(default=None, validation_alias="OPENAI_BASE_URL")
    openai_api_key: SecretStr | None = Field(default=None, validation_alias="OPENAI_API_KEY")
    llm_model: str = "gpt-4o-mini"
    allow_external_llm: bool = False
    # How hard to drive the endpoint and what a run may spend (None: no limit / cost not estimated).
    llm_concurrency: int = Field(default=8, ge=1)
    llm_timeout_s: float = Field(default=60.0, gt=0)
    llm_max_retries: int = Field(default=5, ge=0)
    llm_max_requests: int | None = Field(default=None, ge=1)
    llm_max_tokens: int | None = Field(default=None, ge=1)
    llm_price_per_1k_input: float | None = Field(default=None, ge=0)
    llm_price_per_1k_output: float | None = Field(default=None, ge=0)
    # How the answer schema is imposed: auto probes the endpoint once (README "LLM servers").
    llm_response_format: Literal["auto", "json_schema", "json_object", "prompt"] = "auto"
    # How often a Batch API run (`label --batch`, params pseudo_label.batch) asks whether its batch is done.
    llm_batch_poll_s: float = Field(default=30.0, gt=0)

    # Where models resolved from MLflow URIs are downloaded to (and the engine's ONNX exports go).
    model_cache: Path = Path(".cache/models")

    # The inference engine behind predict, evaluate, the service and monitoring (README "Speed").
    # precision auto: bf16 where the hardware computes it natively (GPU; CPU with AMX or AVX512-BF16),
    # else fp32. int8 is onnxruntime's (dynamic quantisation, CPU, needs the `onnx` extra).
    engine_backend: Literal["torch", "onnxruntime"] = "torch"
    engine_precision: Literal["auto", "fp32", "bf16", "int8"] = "auto"
    # Reports x longest report per batch: short reports go in large batches, long ones in small ones.
    # None: 4096 on CPU (cache-sized batches ran fastest on 2 cores), 65536 on a GPU.
    engine_max_batch_tokens: int | None = Field(default=None, ge=1)

    # Label Studio for radiologist review (`deberta-rad review push/pull`, README "Radiologist review"): where it runs
    # and an API token of an account that may create projects (a personal access token or a legacy one).
    label_studio_url: str = "http://127.0.0.1:8080"
    label_studio_token: SecretStr | None = None

    # The label service (serving/): which model, who may call it, and how much one call may ask.
    serve_model: str = "models:/deberta-rad@champion"
    serve_api_key: SecretStr | None = None
    serve_max_reports: int = Field(default=256, ge=1)
    serve_max_chars: int = Field(default=20_000, ge=1)
    # Adaptive batching across concurrent requests (BentoML) and the engine's own batch size.
    serve_max_batch_size: int = Field(default=256, ge=2)
    serve_max_latency_ms: int = Field(default=60_000, ge=1)
    serve_engine_batch_size: int = Field(default=64, ge=1)
    # How often to check the registry alias for a new champion (0: only on POST /reload).
    serve_poll_s: float = Field(default=30.0, ge=0)
    # The secret MLflow signs its webhook deliveries with (`platform up` / `deberta-rad webhook install`):
    # with it set, POST /webhooks/mlflow makes the service follow a promotion at once, not at the next poll.
    serve_webhook_secret: SecretStr | None = None
    # Opt-in: append every answer (ids, labels, probabilities; never text) to <dir>/<date>.jsonl, the
    # current window for `deberta-rad monitor`.
    serve_capture_dir: Path | None = None

    # A promotion made outside `deberta-rad promote` (the MLflow UI, the API) is checked by the service
    # that follows `champion`, with the gate in params.yaml `promote`: where a refusal is reported, and
    # whether `champion` then moves back (DEBERTA_RAD_PROMOTION_STRICT=true).
    promotion_alert_url: str | None = None
    promotion_strict: bool = False
    promotion_params: Path = Path("params.yaml")


@lru_cache
def get_settings() -> Settings:
    """One Settings per process; tests clear the cache after changing the environment."""
    return Settings()


def venv_command(name: str) -> str:
    """A command installed beside this Python (the project's venv), else the one on PATH: a service or a
    pipeline started from here runs this installation's `bentoml` or `dvc` even when the venv is not
    activated."""
    return shutil.which(name, path=str(Path(sys.executable).parent)) or name
