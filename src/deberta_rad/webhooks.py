"""MLflow's registry webhooks, so a promotion reaches the service at once instead of at its next poll.

MLflow (>= 3.3, on a SQL store) POSTs a JSON event to a registered URL when an alias is set, signed the
way its docs describe (Standard Webhooks style): header `X-MLflow-Signature` is `v1,` and the base64
HMAC-SHA256, under the webhook's secret, of `{delivery id}.{timestamp}.{body}`, with the delivery id and
the Unix timestamp in `X-MLflow-Delivery-Id` and `X-MLflow-Timestamp`. The service checks all three:
the signature, a timestamp within `MAX_AGE_S` of now, and a delivery id it has not seen.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.entities.webhook import Webhook
from mlflow.webhooks.constants import (
    WEBHOOK_DELIVERY_ID_HEADER,
    WEBHOOK_SIGNATURE_HEADER,
    WEBHOOK_SIGNATURE_VERSION,
    WEBHOOK_TIMESTAMP_HEADER,
)

WEBHOOK_NAME = "deberta-rad-service"
WEBHOOK_PATH = "/webhooks/mlflow"
ALIAS_CREATED = ("model_version_alias", "created")
# How far a delivery's timestamp may be from the service's clock (MLflow retries within about 15 s).
MAX_AGE_S = 300


class WebhookRejected(Exception):
    """A delivery the service must not act on: unsigned, wrongly signed, stale, or replayed."""


@dataclass(frozen=True)
class AliasEvent:
    """An alias set on a registered model version (the payload's `data`)."""

    name: str
    alias: str
    version: str


def signature(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """The `X-MLflow-Signature` value MLflow sends for this delivery."""
    signed = delivery_id.encode() + b"." + timestamp.encode() + b"." + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    return f"{WEBHOOK_SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


class DeliveryVerifier:
    """Checks deliveries and remembers their ids for as long as their timestamp would be accepted."""

    def __init__(self, secret: str, max_age_s: float = MAX_AGE_S) -> None:
        self.secret = secret
        self.max_age_s = max_age_s
        self.seen: dict[str, float] = {}  # delivery id -> when its timestamp stops being accepted
        self.lock = threading.Lock()

    def verify(self, headers: dict[str, str], body: bytes, now: float | None = None) -> tuple[str, dict]:
        """The delivery's id and JSON payload when it is signed with the secret, fresh and new; else
        WebhookRejected. The id counts as seen from now on (`release` it when the delivery was not handled,
        so MLflow's retry of it is taken). ``headers`` have lower-case names."""
        now = time.time() if now is None else now
        delivery_id = headers.get(WEBHOOK_DELIVERY_ID_HEADER.lower(), "")
        timestamp = headers.get(WEBHOOK_TIMESTAMP_HEADER.lower(), "")
        sent = headers.get(WEBHOOK_SIGNATURE_HEADER.lower(), "")
        if not (delivery_id and timestamp and sent):
            raise WebhookRejected(
                f"unsigned delivery: {WEBHOOK_SIGNATURE_HEADER}, {WEBHOOK_TIMESTAMP_HEADER} and "
                f"{WEBHOOK_DELIVERY_ID_HEADER} are required"
            )
        expected = signature(self.secret, delivery_id, timestamp, body)
        if not any(hmac.compare_digest(expected.encode(), s.encode()) for s in sent.split()):
            raise WebhookRejected(f"wrong signature in {WEBHOOK_SIGNATURE_HEADER} (is the webhook's secret this one?)")
        try:
            sent_at = int(timestamp)
        except ValueError:
            raise WebhookRejected(f"{WEBHOOK_TIMESTAMP_HEADER} {timestamp!r} is not a Unix time") from None
        if abs(now - sent_at) > self.max_age_s:
            raise WebhookRejected(f"stale delivery: sent {now - sent_at:.0f} s ago, more than {self.max_age_s:g} s")
        try:
            payload = json.loads(body)
        except ValueError:
            raise WebhookRejected("the body is not JSON") from None
        with self.lock:
            self.seen = {seen: until for seen, until in self.seen.items() if until >= now}
            if delivery_id in self.seen:
                raise WebhookRejected(f"replayed delivery {delivery_id}")
            self.seen[delivery_id] = sent_at + self.max_age_s
        return delivery_id, payload

    def release(self, delivery_id: str) -> None:
        """Forget a delivery the service failed to handle: MLflow retries it with the same id."""
        with self.lock:
            self.seen.pop(delivery_id, None)


def alias_event(payload: dict) -> AliasEvent | None:
    """The alias event a payload announces, or None for any other event (MLflow's test deliveries too)."""
    if (payload.get("entity"), payload.get("action")) != ALIAS_CREATED:
        return None
    data = payload.get("data") or {}
    if not all(isinstance(data.get(key), str | int) for key in ("name", "alias", "version")):
        return None
    return AliasEvent(str(data["name"]), str(data["alias"]), str(data["version"]))


def webhook_url(service_url: str) -> str:
    """The receiver's URL on a service at ``service_url`` (given with or without the path)."""
    base = service_url.rstrip("/")
    return base if base.endswith(WEBHOOK_PATH) else base + WEBHOOK_PATH


def find_webhook(client: MlflowClient, name: str = WEBHOOK_NAME) -> Webhook | None:
    """The webhook of that name on the server, if there is one (every page of the listing is read)."""
    page_token = None
    while True:
        page = client.list_webhooks(max_results=100, page_token=page_token)
        for hook in page:
            if hook.name == name:
                return hook
        if not page.token:
            return None
        page_token = page.token


def install_webhook(url: str, secret: str, tracking_uri: str | None = None) -> tuple[str, bool]:
    """Register (or point again) the webhook that tells the service an alias was set; returns its id and
    whether it was created. Needs an account that may manage webhooks (the platform's admin)."""
    from mlflow.entities.webhook import WebhookEvent

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    events = [WebhookEvent(*ALIAS_CREATED)]
    existing = find_webhook(client)
    if existing:
        client.update_webhook(existing.webhook_id, url=url, events=events, secret=secret, status="ACTIVE")
        return existing.webhook_id, False
    description = "Tells the deberta-rad service that an alias moved, so it serves the new champion at once."
    hook = client.create_webhook(WEBHOOK_NAME, url, events=events, description=description, secret=secret)
    return hook.webhook_id, True


def send_test_delivery(webhook_id: str) -> str | None:
    """Ask the MLflow server to send a test alias event to the webhook now (MLflow's example payload,
    which the service answers without acting on it); None when it was answered with 2xx."""
    from mlflow.entities.webhook import WebhookEvent

    result = MlflowClient().test_webhook(webhook_id, event=WebhookEvent(*ALIAS_CREATED))
    if result.success:
        return None
    return result.error_message or f"HTTP {result.response_status}: {(result.response_body or '')[:200]}"
