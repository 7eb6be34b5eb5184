"""BentoML 1.4 service for DeBERTa-RAD: `POST /label` on `LabelService`, which validates, counts and
formats, and a `Labeler` dependency that holds the model and scores texts. Part of the package, so
`bentoml serve deberta_rad.service:LabelService` finds it wherever the package is installed; its
contract and guard are plain code in deberta_rad.serve.

The split is BentoML's adaptive-batching pattern for composed services: `Labeler.score` is batchable,
so texts from concurrent /label calls are merged into one batch by BentoML's dispatcher, and the
engine (deberta_rad.predict) sorts each batch by token length before it runs the model.

Configuration is the environment (deberta_rad.settings, prefix DEBERTA_RAD_): `deberta-rad serve`
sets the model; the limits, batching and API key are `DEBERTA_RAD_SERVE_*`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import bentoml
import numpy as np

from deberta_rad.predict import LabelingEngine, load_engine, prediction_record
from deberta_rad.schema import TeacherInfo
from deberta_rad.serve import (
    PACKED_MODEL_ARG,
    LabelRequest,
    LabelResponse,
    ReportIn,
    RequestGuard,
    Scored,
    capture,
    label_result,
)
from deberta_rad.settings import get_settings

# A child of BentoML's logger, so lines go where BentoML's own go, in its format.
logger = logging.getLogger("bentoml.deberta_rad")
SETTINGS = get_settings()
BENTO_PREFIX = "bentoml:"


def model_reference() -> str:
    """What to serve: in a Bento built by `deberta-rad bento` (its `packed_model` argument names the model
    packed into it), that model, unless DEBERTA_RAD_SERVE_MODEL says otherwise; elsewhere the setting
    (default: the champion alias)."""
    packed = getattr(bentoml.use_arguments(), PACKED_MODEL_ARG, None)
    if packed and "serve_model" not in SETTINGS.model_fields_set:
        return f"{BENTO_PREFIX}{packed}"
    return SETTINGS.serve_model


def resolve_served_model(ref: str) -> tuple[Path, str]:
    """A BentoML model tag (`bentoml:name:version`), a model directory or an MLflow URI to a local
    directory and the version to report."""
    if ref.startswith(BENTO_PREFIX):
        packed = bentoml.models.get(ref.removeprefix(BENTO_PREFIX))
        return Path(packed.path), str(packed.info.metadata.get("model_version", packed.tag))
    from deberta_rad.registry import resolve_model

    return resolve_model(ref)


class ModelHolder:
    """The engine and the version it serves, swapped as one pair so a batch never mixes them."""

    def __init__(self, ref: str, batch_size: int) -> None:
        self.ref = ref
        self.batch_size = batch_size
        self.current = self._load()

    def _load(self) -> tuple[LabelingEngine, str]:
        model_dir, version = resolve_served_model(self.ref)
        engine = load_engine(model_dir, batch_size=self.batch_size)
        logger.info("serving model %s (%s)", version, engine.describe())
        return engine, version

    def follows_alias(self) -> bool:
        return self.ref.startswith("models:/") and "@" in self.ref

    def alias_version(self) -> str:
        """The registered version the alias points at now, e.g. `deberta-rad/3`."""
        from mlflow import MlflowClient

        name, alias = self.ref.removeprefix("models:/").split("@", 1)
        return f"{name}/{MlflowClient().get_model_version_by_alias(name, alias).version}"

    def refresh(self) -> bool:
        """Load the model again if its alias moved (or always, for a directory); True when swapped."""
        if self.follows_alias() and self.alias_version() == self.current[1]:
            return False
        previous = self.current[1]
        self.current = self._load()
        logger.info("swapped model %s for %s", previous, self.current[1])
        return True


# BentoML 1.4.40 renews the caller's connection session every 100 requests and closes the old one with
# calls still in flight on it, which fail with "Server disconnected" under concurrent load
# (bentoml/BentoML#5540). Between two processes on one host there is nothing to gain by renewing it.
NEVER_RENEW = {"max_requests": 2**31 - 1, "max_age": float(2**31)}


@bentoml.service(name="deberta-rad-labeler", workers=1, traffic={"timeout": 600}, runner_connection=NEVER_RENEW)
class Labeler:
    """Holds the student; scores batches; follows the registry alias."""

    def __init__(self) -> None:
        self.holder = ModelHolder(model_reference(), SETTINGS.serve_engine_batch_size)
        self.reload_lock = threading.Lock()
        if SETTINGS.serve_poll_s > 0 and self.holder.follows_alias():
            threading.Thread(target=self._poll_alias, name="alias-poller", daemon=True).start()

    def _poll_alias(self) -> None:
        while True:
            time.sleep(SETTINGS.serve_poll_s)
            try:
                self._refresh()
            except Exception:  # a registry hiccup must not stop the poller; the old model keeps serving
                logger.exception("checking %s for a new version failed", self.holder.ref)

    def _refresh(self) -> bool:
        with self.reload_lock:
            return self.holder.refresh()

    @bentoml.api(
        batchable=True, max_batch_size=SETTINGS.serve_max_batch_size, max_latency_ms=SETTINGS.serve_max_latency_ms
    )
    def score(self, texts: list[str]) -> list[Scored]:
        engine, version = self.holder.current
        probabilities = engine.predict(texts).probabilities
        return [Scored(model_version=version, probabilities=row.tolist()) for row in probabilities]

    @bentoml.api
    async def reload(self) -> dict:
        """Load the alias's current version off the serving thread, then swap: no request waits for it."""
        previous = self.holder.current[1]
        swapped = await asyncio.to_thread(self._refresh)
        return {"previous_version": previous, "model_version": self.holder.current[1], "swapped": swapped}


@bentoml.service(name="deberta-rad", traffic={"timeout": 600, "max_concurrency": 256})
class LabelService:
    """The public API: /label, /reload, plus BentoML's /readyz, /livez and /metrics."""

    labeler = bentoml.depends(Labeler)

    def __init__(self) -> None:
        # prometheus_client must be imported after BentoML has set its multiprocess directory.
        from prometheus_client import Counter, Histogram

        self.latency = Histogram(
            "deberta_rad_label_request_seconds",
            "Latency of /label requests by model version.",
            ["model_version"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
        )
        self.reports = Counter("deberta_rad_reports_labelled", "Reports labelled by model version.", ["model_version"])

    @bentoml.api(route="/label")
    async def label(
        self, reports: list[ReportIn], findings: list[str] | None = None, threshold: float | None = None
    ) -> LabelResponse:
        """Labels for each report, in request order (the contract: deberta_rad.serve.LabelRequest)."""
        started = time.perf_counter()
        request = LabelRequest(reports=reports, findings=findings, threshold=threshold)
        scored = await self._score_one_version([r.text for r in request.reports])
        version = scored[0].model_version
        probabilities = [np.asarray(s.probabilities) for s in scored]
        results = [
            label_result(r.report_id, p, request.findings, request.threshold)
            for r, p in zip(request.reports, probabilities, strict=True)
        ]
        if SETTINGS.serve_capture_dir is not None:
            now = datetime.now(UTC)
            stamp = now.isoformat(timespec="seconds")
            model = TeacherInfo(name="deberta-rad", model=version)
            capture(
                SETTINGS.serve_capture_dir,
                [
                    prediction_record(r.report_id, p, model, r.institution, stamp)
                    for r, p in zip(request.reports, probabilities, strict=True)
                ],
                now,
            )
        elapsed = time.perf_counter() - started
        self.latency.labels(model_version=version).observe(elapsed)
        self.reports.labels(model_version=version).inc(len(results))
        logger.info(
            "labelled %d reports (%d characters) with %s in %.3f s",
            len(results),
            sum(len(r.text) for r in request.reports),
            version,
            elapsed,
        )
        return LabelResponse(model_version=version, results=results)

    async def _score_one_version(self, texts: list[str]) -> list[Scored]:
        """Score texts; if a model swap landed between the batches of this call, score them again, so one
        answer always comes from one model version."""
        scored = await self.labeler.to_async.score(texts)
        if len({s.model_version for s in scored}) > 1:
            scored = await self.labeler.to_async.score(texts)
        return scored

    @bentoml.api(route="/reload")
    async def reload(self) -> dict:
        """Check the registry now instead of waiting for the next poll."""
        return await self.labeler.to_async.reload()


LabelService.add_asgi_middleware(
    RequestGuard,
    api_key=SETTINGS.serve_api_key.get_secret_value() if SETTINGS.serve_api_key else None,
    max_reports=SETTINGS.serve_max_reports,
    max_chars=SETTINGS.serve_max_chars,
)
