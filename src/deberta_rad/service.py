"""BentoML 1.4 service for DeBERTa-RAD: `POST /label` on `LabelService`, which validates, counts and
formats, and a `Labeler` dependency that holds the model and scores texts. Part of the package, so
`bentoml serve deberta_rad.service:LabelService` finds it wherever the package is installed; its
contract and guard are plain code in deberta_rad.serve.

The split is BentoML's adaptive-batching pattern for composed services: `Labeler.score` is batchable,
so texts from concurrent /label calls are merged into one batch by BentoML's dispatcher, and the
engine (deberta_rad.predict) sorts each batch by token length before it runs the model.

The labeler follows a registry alias: at once when MLflow's webhook says it moved (`POST
/webhooks/mlflow`, verified by the guard), every `serve_poll_s` as the fallback, and on `POST /reload`. A
`champion` moved outside `deberta-rad promote` goes through the promotion gate before it is served.

Configuration is the environment (deberta_rad.settings, prefix DEBERTA_RAD_): `deberta-rad serve`
sets the model; the limits, batching, API key and webhook secret are `DEBERTA_RAD_SERVE_*`, the gate's
alert and strict mode `DEBERTA_RAD_PROMOTION_*`.
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
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from deberta_rad.params import PromoteParams, load_params
from deberta_rad.predict import LabelingEngine, load_engine, prediction_record
from deberta_rad.promote import promoted_by_cli, review_promotion
from deberta_rad.registry import CHAMPION
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
from deberta_rad.webhooks import WEBHOOK_PATH, alias_event

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


def followed_alias(ref: str) -> tuple[str, str] | None:
    """The registered model and alias a reference follows (`models:/deberta-rad@champion`), else None."""
    if not ref.startswith("models:/") or "@" not in ref:
        return None
    name, alias = ref.removeprefix("models:/").split("@", 1)
    return name, alias


class ModelHolder:
    """The engine and the version it serves, swapped as one pair so a batch never mixes them."""

    def __init__(self, ref: str, batch_size: int) -> None:
        self.ref = ref
        self.batch_size = batch_size
        self.current = self._load(ref)
        self.held_back: str | None = None  # a champion strict mode would not serve, until the alias moves
        self.alias_target = self.current[1]  # where the followed alias pointed when last looked at

    def _load(self, ref: str) -> tuple[LabelingEngine, str]:
        model_dir, version = resolve_served_model(ref)
        engine = load_engine(model_dir, batch_size=self.batch_size)
        logger.info("serving model %s (%s)", version, engine.describe())
        return engine, version

    def follows_alias(self) -> bool:
        return followed_alias(self.ref) is not None

    def refresh(self) -> bool:
        """Load the alias's version if it moved (always, for a directory); True when swapped. A move of
        `champion` made outside `deberta-rad promote` is put through the gate first; when the gate refuses
        it in strict mode, `champion` goes back and the served model stays. The version loaded is the one
        checked, even if the alias moves again meanwhile (the next refresh takes that move)."""
        followed = followed_alias(self.ref)
        if followed is None:
            return self._swap(self._load(self.ref))
        name, alias = followed
        client = MlflowClient()
        target = client.get_model_version_by_alias(name, alias)
        label = self.alias_target = f"{name}/{target.version}"
        if label == self.current[1]:
            self.held_back = None  # champion is back on the served version: a later move is a new promotion
            return False
        if label == self.held_back:
            return False
        if alias == CHAMPION and self._held_back_by_gate(client, target):
            self.held_back = label
            return False
        engine, _ = self._load(f"models:/{name}/{target.version}")
        return self._swap((engine, label))

    def _swap(self, loaded: tuple[LabelingEngine, str]) -> bool:
        previous, self.current, self.held_back = self.current[1], loaded, None
        logger.info("swapped model %s for %s", previous, self.current[1])
        return True

    def _held_back_by_gate(self, client: MlflowClient, target: ModelVersion) -> bool:
        """Review a new champion against the served one, unless `deberta-rad promote` moved it (its gate
        ran there). True when the served model must stay: strict mode refused the new one (and moved
        `champion` back), or could not review it."""
        if promoted_by_cli(target):
            return False
        name, served = self.current[1].split("/", 1)
        try:
            previous = client.get_model_version(name, served)
            params = SETTINGS.promotion_params
            config = load_params(params).promote if params.is_file() else PromoteParams()
            review = review_promotion(target, previous, config, SETTINGS.promotion_strict, SETTINGS.promotion_alert_url)
        except Exception:  # e.g. an account that may not tag versions: say so, and follow unless strict
            logger.exception("the gate could not review version %s as %s", target.version, CHAMPION)
            if SETTINGS.promotion_strict:
                logger.error("strict mode: serving %s until %s moves again", self.current[1], CHAMPION)
            return SETTINGS.promotion_strict
        (logger.info if review.verdict == "passed" else logger.warning)("%s", review.describe())
        if review.alert_failure:
            logger.error("the promotion alert was not delivered: %s", review.alert_failure)
        return review.reverted

    def gate_verdict(self) -> str:
        """The served version's `promotion.gate` tag (`not registered` for a directory or a packed model)."""
        if not self.follows_alias():
            return "not registered"
        name, version = self.current[1].split("/", 1)
        return MlflowClient().get_model_version(name, version).tags.get("promotion.gate", "not recorded")


# BentoML 1.4.40 renews the caller's connection session every 100 requests and closes the old one with
# calls still in flight on it, which fail with "Server disconnected" under concurrent load
# (bentoml/BentoML#5540). Between two processes on one host there is nothing to gain by renewing it.
NEVER_RENEW = {"max_requests": 2**31 - 1, "max_age": float(2**31)}


@bentoml.service(name="deberta-rad-labeler", workers=1, traffic={"timeout": 600}, runner_connection=NEVER_RENEW)
class Labeler:
    """Holds the student; scores batches; follows the registry alias."""

    def __init__(self) -> None:
        # prometheus_client must be imported after BentoML has set its multiprocess directory.
        from prometheus_client import Gauge

        self.served = Gauge(
            "deberta_rad_served_model",
            "1 for the model version served now and the promotion gate's verdict on it, 0 for earlier ones.",
            ["model_version", "promotion_gate"],
            multiprocess_mode="livemostrecent",
        )
        self.alias_gauge = Gauge(
            "deberta_rad_registry_alias",
            "1 for the version the followed alias pointed at when last checked (alerts: served is not champion).",
            ["alias", "model_version"],
            multiprocess_mode="livemostrecent",
        )
        self.published: tuple[str, str] | None = None
        self.published_target: str | None = None
        self.holder = ModelHolder(model_reference(), SETTINGS.serve_engine_batch_size)
        self.reload_lock = threading.Lock()
        self._publish()
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
            swapped = self.holder.refresh()
            if swapped or self.holder.alias_target != self.published_target:
                self._publish()
            return swapped

    def _publish(self) -> None:
        """Show the served version with its gate verdict, and the followed alias's target, in /metrics (the
        earlier ones drop to 0)."""
        try:
            verdict = self.holder.gate_verdict()
        except Exception:  # the registry is unreachable: the model serves all the same
            logger.exception("reading the gate verdict of %s failed", self.holder.current[1])
            verdict = "unknown"
        if self.published:
            self.served.labels(*self.published).set(0)
        self.published = (self.holder.current[1], verdict)
        self.served.labels(*self.published).set(1)
        if followed := followed_alias(self.holder.ref):
            if self.published_target:
                self.alias_gauge.labels(followed[1], self.published_target).set(0)
            self.published_target = self.holder.alias_target
            self.alias_gauge.labels(followed[1], self.published_target).set(1)

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
    """The public API: /label, /reload, /webhooks/mlflow, plus BentoML's /readyz, /livez and /metrics."""

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
        self.following: set[asyncio.Task] = set()  # webhook-triggered swaps in flight

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

    @bentoml.api(route=WEBHOOK_PATH)
    async def mlflow_webhook(self, entity: str = "", action: str = "", data: dict | None = None) -> dict:
        """MLflow's webhook (its signature, age and id checked by RequestGuard): when the followed alias
        moves, follow it now. Answered at once; the swap runs in the background, so MLflow's delivery
        never waits for a model download."""
        event = alias_event({"entity": entity, "action": action, "data": data})
        if event is None or (event.name, event.alias) != followed_alias(model_reference()):
            return {"accepted": False, "reason": f"not a move of {model_reference()}"}
        logger.info("webhook: %s of %s moved to version %s", event.alias, event.name, event.version)
        task = asyncio.create_task(self.labeler.to_async.reload())
        self.following.add(task)
        task.add_done_callback(self._followed)
        return {"accepted": True, "version": event.version}

    def _followed(self, task: asyncio.Task) -> None:
        self.following.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        logger.error("following the webhook's alias move failed: %s", task.exception())


LabelService.add_asgi_middleware(
    RequestGuard,
    api_key=SETTINGS.serve_api_key.get_secret_value() if SETTINGS.serve_api_key else None,
    max_reports=SETTINGS.serve_max_reports,
    max_chars=SETTINGS.serve_max_chars,
    webhook_secret=SETTINGS.serve_webhook_secret.get_secret_value() if SETTINGS.serve_webhook_secret else None,
)
