"""MLflow's webhook deliveries to the service: signed as MLflow's own delivery code signs them, checked for
signature, age and replay in front of the service; and the gate's review of a promotion made outside
`deberta-rad promote`, on a real (SQLite) registry."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
from conftest import AlertSink
from mlflow import MlflowClient
from mlflow.webhooks.delivery import _generate_hmac_signature
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from deberta_rad.params import PromoteParams
from deberta_rad.promote import (
    CLI_ROUTE,
    EVALUATION_DATA_TAG,
    OTHER_ROUTE,
    promote_version,
    promoted_by_cli,
    promotion_candidates,
    review_promotion,
)
from deberta_rad.registry import CHAMPION, finding_f1_tag
from deberta_rad.schema import FINDINGS
from deberta_rad.serve import RequestGuard
from deberta_rad.webhooks import WEBHOOK_PATH, DeliveryVerifier, WebhookRejected, alias_event, webhook_url

SECRET = "webhook-secret-0123"
NAME = "deberta-rad"


def delivery(payload: dict, secret: str = SECRET, sent_at: float | None = None) -> tuple[dict[str, str], bytes]:
    """Headers and body exactly as MLflow's delivery code builds them."""
    body = json.dumps(payload)
    delivery_id, timestamp = str(uuid.uuid4()), str(int(time.time() if sent_at is None else sent_at))
    headers = {
        "x-mlflow-delivery-id": delivery_id,
        "x-mlflow-timestamp": timestamp,
        "x-mlflow-signature": _generate_hmac_signature(secret, delivery_id, timestamp, body),
    }
    return headers, body.encode()


ALIAS_SET = {
    "entity": "model_version_alias",
    "action": "created",
    "timestamp": "2026-12-01T00:00:00+00:00",
    "data": {"name": NAME, "alias": CHAMPION, "version": "2"},
}


def test_a_delivery_signed_by_mlflow_passes_once() -> None:
    verifier = DeliveryVerifier(SECRET)
    headers, body = delivery(ALIAS_SET)
    assert verifier.verify(headers, body) == (headers["x-mlflow-delivery-id"], ALIAS_SET)
    with pytest.raises(WebhookRejected, match="replayed"):
        verifier.verify(headers, body)
    verifier.release(headers["x-mlflow-delivery-id"])  # the service failed on it: MLflow's retry is taken
    assert verifier.verify(headers, body)[1] == ALIAS_SET


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda h, b: (h, b.replace(b'"2"', b'"3"')), "wrong signature"),
        (lambda h, b: (dict(h, **{"x-mlflow-signature": "v1,AAAA"}), b), "wrong signature"),
        (lambda h, b: ({k: v for k, v in h.items() if k != "x-mlflow-signature"}, b), "unsigned"),
        (lambda h, b: ({k: v for k, v in h.items() if k != "x-mlflow-delivery-id"}, b), "unsigned"),
    ],
    ids=["body changed", "signature forged", "no signature", "no delivery id"],
)
def test_tampered_or_unsigned_deliveries_are_refused(change, reason: str) -> None:
    headers, body = change(*delivery(ALIAS_SET))
    with pytest.raises(WebhookRejected, match=reason):
        DeliveryVerifier(SECRET).verify(headers, body)


def test_another_secret_and_stale_deliveries_are_refused() -> None:
    with pytest.raises(WebhookRejected, match="wrong signature"):
        DeliveryVerifier(SECRET).verify(*delivery(ALIAS_SET, secret="someone-else"))
    with pytest.raises(WebhookRejected, match="stale"):
        DeliveryVerifier(SECRET).verify(*delivery(ALIAS_SET, sent_at=time.time() - 3600))


def test_alias_events_are_read_and_other_events_ignored() -> None:
    event = alias_event(ALIAS_SET)
    assert event is not None and (event.name, event.alias, event.version) == (NAME, CHAMPION, "2")
    assert alias_event({**ALIAS_SET, "action": "deleted"}) is None
    assert alias_event({"entity": "model_version_alias", "action": "created", "data": {"name": NAME}}) is None
    assert webhook_url("http://127.0.0.1:3000/") == "http://127.0.0.1:3000" + WEBHOOK_PATH
    assert webhook_url("http://127.0.0.1:3000" + WEBHOOK_PATH) == "http://127.0.0.1:3000" + WEBHOOK_PATH


def guarded_webhook(secret: str | None, failures: int = 0) -> TestClient:
    """The guard in front of an app that echoes the delivery, after answering 500 ``failures`` times."""
    left = [failures]

    async def echo(request):
        if left[0]:
            left[0] -= 1
            return JSONResponse({"error": "not now"}, status_code=500)
        return JSONResponse(await request.json())

    inner = Starlette(routes=[Route(WEBHOOK_PATH, echo, methods=["POST"])])
    return TestClient(RequestGuard(inner, api_key="a-key", max_reports=2, max_chars=10, webhook_secret=secret))


def test_the_guard_passes_signed_deliveries_without_the_api_key_and_refuses_the_rest() -> None:
    client = guarded_webhook(SECRET)
    headers, body = delivery(ALIAS_SET)
    answer = client.post(WEBHOOK_PATH, content=body, headers=headers)
    assert answer.status_code == 200 and answer.json() == ALIAS_SET
    again = client.post(WEBHOOK_PATH, content=body, headers=headers)
    assert again.status_code == 401 and "replayed" in again.json()["error"]
    assert client.post(WEBHOOK_PATH, json=ALIAS_SET).status_code == 401
    unset = guarded_webhook(None).post(WEBHOOK_PATH, content=body, headers=headers)
    assert unset.status_code == 404 and "DEBERTA_RAD_SERVE_WEBHOOK_SECRET" in unset.json()["error"]


def test_a_delivery_the_service_failed_on_is_taken_when_mlflow_retries_it() -> None:
    client = guarded_webhook(SECRET, failures=1)
    headers, body = delivery(ALIAS_SET)
    assert client.post(WEBHOOK_PATH, content=body, headers=headers).status_code == 500
    assert client.post(WEBHOOK_PATH, content=body, headers=headers).status_code == 200


# ----------------------------------------------------------------------------------------------
# The gate's review of a promotion made in the UI or through the API, on a SQLite registry
# ----------------------------------------------------------------------------------------------


def evaluated(macro_f1: float, per_finding: float) -> dict[str, str]:
    """Version tags of an evaluation on one test split."""
    tags = {EVALUATION_DATA_TAG: "same-split", "eval.teacher.macro_f1": f"{macro_f1:.4f}"}
    return tags | {finding_f1_tag("teacher", f): f"{per_finding:.4f}" for f in FINDINGS}


@pytest.fixture
def registry(isolated_mlflow: str, tmp_path: Path) -> MlflowClient:
    """Versions 1 (champion), 2 (better), 3 (worse) and 4 (never evaluated) of a registered model."""
    client = MlflowClient()
    client.create_registered_model(NAME)
    for tags in (evaluated(0.80, 0.80), evaluated(0.85, 0.85), evaluated(0.60, 0.60), {}):
        client.create_model_version(NAME, str(tmp_path / "model"), tags=tags)
    client.set_registered_model_alias(NAME, CHAMPION, "1")
    return client


def review(client: MlflowClient, version: str, strict: bool, alert_url: str | None):
    previous = client.get_model_version_by_alias(NAME, CHAMPION)
    client.set_registered_model_alias(NAME, CHAMPION, version)  # as the UI does: no tags, no gate
    candidate = client.get_model_version(NAME, version)
    return review_promotion(candidate, previous, PromoteParams(reference="teacher"), strict, alert_url)


def test_a_better_version_set_in_the_ui_is_recorded_as_passed(registry: MlflowClient, alerts: AlertSink) -> None:
    result = review(registry, "2", strict=True, alert_url=alerts.url)
    tags = registry.get_model_version(NAME, "2").tags
    assert (result.verdict, result.reverted) == ("passed", False)
    assert tags["promotion.gate"] == "passed" and tags["promotion.route"] == OTHER_ROUTE
    assert tags["promotion.previous_champion"] == "1" and tags["promotion.by"].startswith("unknown")
    assert str(registry.get_model_version_by_alias(NAME, CHAMPION).version) == "2" and alerts.received == []


def test_a_worse_version_is_refused_alerted_and_in_strict_mode_moved_back(
    registry: MlflowClient, alerts: AlertSink
) -> None:
    result = review(registry, "3", strict=True, alert_url=alerts.url)
    tags = registry.get_model_version(NAME, "3").tags
    assert (result.verdict, result.reverted, result.alert_failure) == ("refused", True, None)
    assert tags["promotion.gate"] == "refused" and "Macro F1" in tags["promotion.gate_detail"]
    assert tags["promotion.reverted"] == f"{CHAMPION} moved back to version 1"
    assert str(registry.get_model_version_by_alias(NAME, CHAMPION).version) == "1"
    [alert] = alerts.received
    assert (alert["verdict"], alert["version"], alert["previous_champion"], alert["reverted"]) == (
        "refused",
        "3",
        "1",
        True,
    )
    assert "Gate failed" in alert["gate"]


def test_without_strict_a_refused_version_stays_champion_and_an_unreachable_alert_is_reported(
    registry: MlflowClient,
) -> None:
    result = review(registry, "3", strict=False, alert_url="http://127.0.0.1:9/alerts")
    assert (result.verdict, result.reverted) == ("refused", False) and "127.0.0.1:9" in result.alert_failure
    assert str(registry.get_model_version_by_alias(NAME, CHAMPION).version) == "3"
    assert "moved back" not in result.describe() and "gate: refused" in result.describe()


def test_a_version_without_evaluation_is_not_comparable_and_treated_as_promote_treats_it(
    registry: MlflowClient, alerts: AlertSink
) -> None:
    result = review(registry, "4", strict=True, alert_url=alerts.url)
    assert (result.verdict, result.reverted) == ("not comparable", True)  # promote refuses it without --force
    assert "no evaluation" in registry.get_model_version(NAME, "4").tags["promotion.gate_detail"]
    assert [alert["verdict"] for alert in alerts.received] == ["not comparable"]


def test_a_fresh_cli_promotion_is_recognised_but_an_old_one_moved_back_in_the_ui_is_not(
    registry: MlflowClient,
) -> None:
    candidate, champion = promotion_candidates(2)
    promote_version(candidate, champion, None, None)
    promoted = registry.get_model_version(NAME, "2")
    assert promoted.tags["promotion.route"] == CLI_ROUTE and promoted_by_cli(promoted)
    registry.set_model_version_tag(NAME, "2", "promotion.at", "2026-01-01T00:00:00+00:00")  # long ago
    assert not promoted_by_cli(registry.get_model_version(NAME, "2"))


def test_review_tags_replace_those_of_an_earlier_forced_promotion(registry: MlflowClient) -> None:
    registry.set_model_version_tag(NAME, "2", "promotion.forced_reason", "an old override")
    review(registry, "2", strict=False, alert_url=None)
    assert "promotion.forced_reason" not in registry.get_model_version(NAME, "2").tags


def test_webhook_install_names_what_is_missing(isolated_mlflow: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from deberta_rad.cli import app
    from deberta_rad.settings import get_settings

    no_secret = CliRunner().invoke(app, ["webhook", "install", "--url", "http://127.0.0.1:3000"])
    assert no_secret.exit_code == 2 and "DEBERTA_RAD_SERVE_WEBHOOK_SECRET" in no_secret.output
    monkeypatch.setenv("DEBERTA_RAD_SERVE_WEBHOOK_SECRET", SECRET)
    get_settings.cache_clear()
    embedded = CliRunner().invoke(app, ["webhook", "install", "--url", "http://127.0.0.1:3000"])
    assert embedded.exit_code == 2 and "only an MLflow tracking server delivers webhooks" in embedded.output
    assert "Traceback" not in embedded.output


# ----------------------------------------------------------------------------------------------
# The service's model holder following `champion` on that registry (the model itself stubbed out)
# ----------------------------------------------------------------------------------------------


class StubEngine:
    """Stands in for the labelling engine: what is under test is which version gets loaded."""

    def describe(self) -> dict:
        return {}


@pytest.fixture
def holder(registry: MlflowClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A strict-mode holder of `models:/deberta-rad@champion`; ``holder.loaded`` lists the refs it loaded."""
    from deberta_rad import service

    loaded: list[str] = []

    def resolve(ref: str) -> tuple[Path, str]:
        loaded.append(ref)
        if ref.endswith(f"@{CHAMPION}"):
            return tmp_path, f"{NAME}/{registry.get_model_version_by_alias(NAME, CHAMPION).version}"
        return tmp_path, ref

    monkeypatch.setattr(service, "resolve_served_model", resolve)
    monkeypatch.setattr(service, "load_engine", lambda model_dir, batch_size: StubEngine())
    monkeypatch.setattr(service.SETTINGS, "promotion_strict", True)
    monkeypatch.setattr(service.SETTINGS, "promotion_alert_url", None)
    monkeypatch.setattr(service.SETTINGS, "promotion_params", tmp_path / "no-params.yaml")
    followed = service.ModelHolder(f"models:/{NAME}@{CHAMPION}", batch_size=4)
    followed.loaded = loaded
    return followed


def champion_now(registry: MlflowClient) -> str:
    return str(registry.get_model_version_by_alias(NAME, CHAMPION).version)


def test_strict_mode_keeps_serving_and_moves_champion_back_from_a_worse_version(holder, registry: MlflowClient) -> None:
    registry.set_registered_model_alias(NAME, CHAMPION, "3")
    assert not holder.refresh()
    assert holder.current[1] == f"{NAME}/1" and champion_now(registry) == "1"
    registry.set_registered_model_alias(NAME, CHAMPION, "2")
    assert holder.refresh() and holder.current[1] == f"{NAME}/2"
    assert holder.loaded[-1] == f"models:/{NAME}/2"  # the version the gate checked, pinned


def test_the_version_loaded_is_the_one_checked_when_champion_moves_again_meanwhile(
    holder, registry: MlflowClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deberta_rad import service

    resolve = service.resolve_served_model

    def moved_during_download(ref: str) -> tuple[Path, str]:
        if ref == f"models:/{NAME}/2":
            registry.set_registered_model_alias(NAME, CHAMPION, "3")  # someone moves it again in the UI
        return resolve(ref)

    monkeypatch.setattr(service, "resolve_served_model", moved_during_download)
    registry.set_registered_model_alias(NAME, CHAMPION, "2")
    assert holder.refresh() and holder.current[1] == f"{NAME}/2"
    assert not holder.refresh()  # the second move gets the gate too: 3 is refused, champion back on 2
    assert holder.current[1] == f"{NAME}/2" and champion_now(registry) == "2"


def test_a_champion_that_cannot_be_reviewed_is_held_back_once_not_retried_on_every_poll(
    holder, registry: MlflowClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.exceptions import MlflowException

    from deberta_rad import service

    calls = []

    def refused_by_the_store(*args: object) -> None:
        calls.append(args)
        raise MlflowException("Permission denied")

    monkeypatch.setattr(service, "review_promotion", refused_by_the_store)
    registry.set_registered_model_alias(NAME, CHAMPION, "2")
    assert not holder.refresh() and not holder.refresh()
    assert holder.current[1] == f"{NAME}/1" and len(calls) == 1
    registry.set_registered_model_alias(NAME, CHAMPION, "1")  # back on the served version: a later move is new
    assert not holder.refresh()
    registry.set_registered_model_alias(NAME, CHAMPION, "2")
    assert not holder.refresh() and len(calls) == 2
