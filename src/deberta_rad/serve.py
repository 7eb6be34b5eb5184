"""The labelling service's contract and its guard, kept apart from the BentoML service itself
(deberta_rad.service) so they are plain code to test: the request and response models, how
probabilities become answers, and the ASGI middleware that checks the API key, the JSON and the limits
before a request reaches BentoML. Also the commands that start the service and build a Bento of it.

Why a guard in front of BentoML's own validation: BentoML 1.4 logs a traceback with pydantic's
`input_value` for a request that fails validation, i.e. it would write report text to the log. The
guard answers every bad request itself with a 4xx that names what and where, and never echoes input.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from deberta_rad.net import is_loopback_host
from deberta_rad.predict import status_probabilities
from deberta_rad.schema import FINDING_INDEX, FINDINGS, STATUSES, LabelRecord, Status
from deberta_rad.settings import venv_command
from deberta_rad.webhooks import WEBHOOK_PATH, DeliveryVerifier, WebhookRejected

logger = logging.getLogger(__name__)

# `bentoml serve` finds the service through the installed package, wherever it runs.
SERVICE = "deberta_rad.service:LabelService"
# The Bento's build context (bentofile.yaml) in a source checkout: `deberta-rad bento` builds a wheel of it.
BENTO_DIR = Path(__file__).resolve().parents[2] / "serving"
# The model a Bento carries, in BentoML's model store (`deberta-rad bento` puts it there).
PACKED_MODEL = "deberta-rad-student"
# The Bento argument (bentoml.use_arguments) naming the exact packed model a built Bento serves.
PACKED_MODEL_ARG = "packed_model"
API_KEY_HEADER = "x-api-key"
GUARDED_PATHS = ("/label", "/reload")
# The largest MLflow webhook delivery taken (an alias event is a few hundred bytes).
MAX_WEBHOOK_BYTES = 65536


class ReportIn(BaseModel):
    """One report to label; the id comes back with its labels."""

    model_config = ConfigDict(extra="forbid")

    report_id: str = Field(min_length=1)
    text: str = Field(min_length=1)
    institution: str | None = Field(default=None, description="Where the report comes from (drift monitoring).")

    @field_validator("text")
    @classmethod
    def _not_blank(cls, text: str) -> str:
        if not text.strip():
            raise ValueError("text is blank")
        return text


class LabelRequest(BaseModel):
    """`POST /label`: reports, an optional subset of findings, an optional confidence threshold."""

    model_config = ConfigDict(extra="forbid")

    reports: list[ReportIn] = Field(min_length=1)
    findings: list[str] | None = Field(default=None, min_length=1)
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)

    @field_validator("findings")
    @classmethod
    def _known_findings(cls, findings: list[str] | None) -> list[str] | None:
        unknown = [f for f in findings or [] if f not in FINDING_INDEX]
        if unknown:
            raise ValueError(f"unknown findings {unknown}; known: {list(FINDINGS)}")
        return findings


class LabelResult(BaseModel):
    report_id: str
    labels: dict[str, Status]
    probabilities: dict[str, dict[str, float]]
    # With a request threshold: the findings whose status is less probable than it, for a person to read.
    # Their labels stay the model's: `uncertain` is a clinical status (the report hedges), not an abstention.
    low_confidence: list[str] = Field(default_factory=list)


class LabelResponse(BaseModel):
    model_version: str
    results: list[LabelResult]


class Scored(BaseModel):
    """What the model worker returns per report: the version that scored it and its [13, 4] probabilities."""

    model_version: str
    probabilities: list[list[float]]


def label_result(
    report_id: str, probabilities: np.ndarray, findings: Sequence[str] | None, threshold: float | None
) -> LabelResult:
    """One report's answer: the model's status per finding. With a threshold, the findings whose status is
    less probable than it are listed in `low_confidence`, so a caller can route those cells to a person."""
    chosen = findings or FINDINGS
    labels: dict[str, str] = {}
    scores: dict[str, dict[str, float]] = {}
    unsure: list[str] = []
    for finding in chosen:
        row = probabilities[FINDING_INDEX[finding]]
        best = int(row.argmax())
        labels[finding] = STATUSES[best]
        scores[finding] = status_probabilities(row)
        if threshold is not None and float(row[best]) < threshold:
            unsure.append(finding)
    return LabelResult(report_id=report_id, labels=labels, probabilities=scores, low_confidence=unsure)


def capture(directory: Path, records: Sequence[LabelRecord], now: datetime) -> Path:
    """Append captured answers to `<directory>/<UTC date>.jsonl`, one line each."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{now.date().isoformat()}.jsonl"
    with path.open("a", encoding="utf-8") as handle:
        handle.writelines(r.model_dump_json(exclude_none=True) + "\n" for r in records)
    return path


def error_location(loc: Sequence[int | str]) -> str:
    """pydantic's ('reports', 3, 'text') as `reports[3].text`."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "body"


def validation_problems(error: ValidationError) -> list[dict[str, str]]:
    """Where and what, never the offending value (it may be report text)."""
    return [{"loc": error_location(e["loc"]), "msg": e["msg"]} for e in error.errors(include_input=False)]


class LimitExceeded(ValueError):
    """A request within the contract but over the service's limits (413)."""


def check_limits(request: LabelRequest, max_reports: int, max_chars: int) -> None:
    """Raise LimitExceeded naming the first report over the length limit, or the count over the limit."""
    if len(request.reports) > max_reports:
        raise LimitExceeded(f"{len(request.reports)} reports in one call; the limit is {max_reports}")
    for i, report in enumerate(request.reports):
        if len(report.text) > max_chars:
            raise LimitExceeded(f"reports[{i}].text has {len(report.text)} characters; the limit is {max_chars}")


Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


class RequestGuard:
    """ASGI middleware for the label service: API key, body size, JSON, schema and limits, answered
    with 4xx JSON before BentoML sees the request. Other paths (/readyz, /livez, /metrics) pass through.
    A /label request that passes is replayed unchanged to the app; /reload takes no input, so the app gets
    an empty body (BentoML would log a traceback with the content of a body it cannot parse). MLflow's
    webhook deliveries carry no API key: they pass only when signed with the webhook's secret, fresh and new."""

    def __init__(
        self, app: Any, api_key: str | None, max_reports: int, max_chars: int, webhook_secret: str | None = None
    ) -> None:
        self.app = app
        self.api_key = api_key
        self.max_reports = max_reports
        self.max_chars = max_chars
        # Room for JSON quoting and escapes around the longest allowed payload.
        self.max_body_bytes = max_reports * (max_chars * 6 + 1024) + 65536
        self.deliveries = DeliveryVerifier(webhook_secret) if webhook_secret else None

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == WEBHOOK_PATH:
            await self.handle_delivery(scope, receive, send)
            return
        if scope["type"] != "http" or scope["path"] not in GUARDED_PATHS:
            await self.app(scope, receive, send)
            return
        refusal = self.check_access(scope)
        if refusal is not None:
            await _send_json(send, *refusal)
            return
        label = scope["path"] == "/label"
        body = await _read_body(receive, self.max_body_bytes)
        refusal = self.check_label_body(body) if label else self.check_reload_body(body)
        if refusal is not None:
            await _send_json(send, *refusal)
            return
        await self.app(scope, _replay(body if label else b""), send)

    async def handle_delivery(self, scope: dict, receive: Receive, send: Send) -> None:
        """Pass an MLflow webhook delivery to the app only when it is verified; answer 401 otherwise, and
        404 when the service has no webhook secret (MLflow retries neither; it retries 429 and 5xx, so a
        delivery the app failed on with a 5xx is released for that retry)."""
        if self.deliveries is None:
            await _send_json(send, 404, {"error": "no webhook here: DEBERTA_RAD_SERVE_WEBHOOK_SECRET is not set"})
            return
        body = await _read_body(receive, MAX_WEBHOOK_BYTES)
        if body is None:
            await _send_json(send, 413, {"error": f"webhook body over {MAX_WEBHOOK_BYTES} bytes"})
            return
        try:
            delivery_id, _ = self.deliveries.verify(_headers(scope), body)
        except WebhookRejected as rejected:
            logger.warning("refused a webhook delivery: %s", rejected)
            await _send_json(send, 401, {"error": str(rejected)})
            return
        status = 500

        async def send_and_note_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, _replay(body), send_and_note_status)
        finally:
            if status >= 500:
                self.deliveries.release(delivery_id)

    def check_access(self, scope: dict) -> tuple[int, dict] | None:
        """Off loopback a key is required; with a key set, every caller must send it."""
        headers = _headers(scope)
        server_host = (scope.get("server") or ("127.0.0.1", 0))[0]
        if self.api_key is None:
            if is_loopback_host(server_host):
                return None
            return 503, {"error": "reached off loopback but no API key is set: set DEBERTA_RAD_SERVE_API_KEY"}
        if not hmac.compare_digest(headers.get(API_KEY_HEADER, "").encode(), self.api_key.encode()):
            return 401, {"error": f"missing or wrong API key in the {API_KEY_HEADER} header"}
        return None

    def check_label_body(self, body: bytes | None) -> tuple[int, dict] | None:
        """None when the body is a valid request within the limits, else the status and error to answer."""
        if body is None:
            return 413, {"error": f"request body over {self.max_body_bytes} bytes"}
        payload, refusal = _json_payload(body)
        if refusal is not None:
            return refusal
        try:
            request = LabelRequest.model_validate(payload)
        except ValidationError as error:
            return 422, {"error": "request does not match the /label contract", "detail": validation_problems(error)}
        try:
            check_limits(request, self.max_reports, self.max_chars)
        except LimitExceeded as error:
            return 413, {"error": str(error)}
        return None

    def check_reload_body(self, body: bytes | None) -> tuple[int, dict] | None:
        """/reload takes no input: None for no body or a JSON object (its keys are ignored), else a 4xx."""
        if body is None:
            return 413, {"error": f"request body over {self.max_body_bytes} bytes"}
        if not body.strip():
            return None
        payload, refusal = _json_payload(body)
        if refusal is not None:
            return refusal
        if not isinstance(payload, dict):
            return 422, {"error": "/reload takes no input: send no body or a JSON object"}
        return None


def _headers(scope: dict) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def _json_payload(body: bytes) -> tuple[Any, tuple[int, dict] | None]:
    """The parsed body, or the 400 to answer (never quoting the body)."""
    try:
        return json.loads(body), None
    except json.JSONDecodeError as error:
        where = f"line {error.lineno}, column {error.colno}"
        return None, (400, {"error": f"body is not valid JSON: {error.msg} at {where}"})
    except UnicodeDecodeError:
        return None, (400, {"error": "body is not UTF-8 JSON"})
    except RecursionError:  # json.loads gives up on arrays/objects nested about a thousand deep
        return None, (400, {"error": "body is not acceptable JSON: nested too deeply"})


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None once it grows past `limit` bytes."""
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


def _replay(body: bytes) -> Receive:
    """A receive callable that hands the already-read body to the app."""
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def _send_json(send: Send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def serve_command(host: str, port: int) -> list[str]:
    """`bentoml serve` of the installed package's service, the way the README runs it by hand."""
    return [venv_command("bentoml"), "serve", SERVICE, "--host", host, "--port", str(port)]


def absolute_tracking_uri(uri: str, base: Path) -> str:
    """`sqlite:///mlflow.db` relative to `base` as an absolute URI, so the service finds the same store
    whatever directory BentoML runs it from."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.removeprefix(prefix).startswith("/"):
        return prefix + str((base / uri.removeprefix(prefix)).resolve())
    return uri


def run_server(model: str, host: str, port: int, api_key: str | None) -> int:
    """Start `bentoml serve` in the foreground with the model and store resolved from here."""
    from deberta_rad.registry import check_model_ref
    from deberta_rad.settings import get_settings
    from deberta_rad.tracking import export_credentials

    if not is_loopback_host(host) and not api_key:
        raise ValueError(f"--host {host} is not loopback: set DEBERTA_RAD_SERVE_API_KEY (or --api-key) first")
    check_model_ref(model)
    if Path(model).is_dir():
        model = str(Path(model).resolve())
    settings = get_settings()
    export_credentials()  # the service reads the registry (and records gate verdicts) as this account
    env = os.environ | {
        "DEBERTA_RAD_SERVE_MODEL": model,
        "DEBERTA_RAD_MODEL_CACHE": str(Path(settings.model_cache).resolve()),
        "MLFLOW_TRACKING_URI": absolute_tracking_uri(settings.mlflow_tracking_uri, Path.cwd()),
        "DEBERTA_RAD_PROMOTION_PARAMS": str(settings.promotion_params.resolve()),
    }
    if api_key:
        env["DEBERTA_RAD_SERVE_API_KEY"] = api_key
    return subprocess.call(serve_command(host, port), env=env)


def tag_safe(version: str) -> str:
    """A model version such as `deberta-rad/3` or a path as a BentoML label value."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in version).strip("_.-")[:63] or "unknown"


def pack_model(model_ref: str) -> tuple[str, str]:
    """Copy a model (directory or MLflow URI) into BentoML's model store as `deberta-rad-student`;
    returns the BentoML tag and the version it packs."""
    import bentoml

    from deberta_rad.registry import resolve_model

    model_dir, version = resolve_model(model_ref)
    with bentoml.models.create(
        PACKED_MODEL, labels={"model_version": tag_safe(version)}, metadata={"model_version": version}
    ) as packed:
        shutil.copytree(model_dir, packed.path, dirs_exist_ok=True)
    return str(packed.tag), version


def build_wheel(bento_dir: Path = BENTO_DIR) -> Path:
    """A wheel of this project in serving/wheels/, which the bentofile installs into the Bento's image:
    the service inside the Bento is the one in that wheel."""
    wheels = bento_dir / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(wheels)]
    subprocess.run([*pip_wheel, str(bento_dir.parent)], check=True)
    return next(wheels.glob("deberta_rad-*.whl"))


def build_bento(model_ref: str, bento_dir: Path = BENTO_DIR) -> tuple[str, str]:
    """`bentoml build` of serving/bentofile.yaml with the model packed in; returns the Bento tag and model
    version. The Bento's `packed_model` argument tells the service inside it which model it carries."""
    import bentoml
    import yaml

    if not (bento_dir / "bentofile.yaml").is_file():
        raise FileNotFoundError(
            f"no {bento_dir / 'bentofile.yaml'}: `deberta-rad bento` builds from a source checkout of the project"
        )
    model_tag, version = pack_model(model_ref)
    wheel = build_wheel(bento_dir)
    listed = yaml.safe_load((bento_dir / "bentofile.yaml").read_text())["python"]["wheels"]
    if f"wheels/{wheel.name}" not in listed:
        raise ValueError(f"serving/bentofile.yaml lists {listed}, but the project's wheel is wheels/{wheel.name}")
    # BentoML resolves the bentofile's wheel paths against the working directory, not the build context.
    previous = Path.cwd()
    os.chdir(bento_dir)
    try:
        bento = bentoml.bentos.build_bentofile(
            "bentofile.yaml",
            build_ctx=".",
            labels={"model_version": tag_safe(version), "packed_model": tag_safe(model_tag)},
            args={PACKED_MODEL_ARG: model_tag},
        )
    finally:
        os.chdir(previous)
    return str(bento.tag), version
