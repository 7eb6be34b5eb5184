"""A real local HTTP server that speaks the Chat Completions protocol and injects faults on demand.

The LLM teacher is tested against real sockets rather than a mocked SDK, so retries, timeouts and
dropped connections go through the same HTTP stack they meet in production. Answers are computed
deterministically from the report text (keywords plus negation/hedge cues), so tests can check that
every report ends up with exactly what the server answered.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from deberta_rad.schema import apply_no_finding_rule

FAULTS = (
    "429",
    "500",
    "400",
    "401",
    "503",
    "context",
    "not_json",
    "missing_finding",
    "invalid_status",
    "no_finding",
    "slow",
    "drop",
)
# What a server says when the prompt and answer overflow a slot's context (llama-server's words).
CONTEXT_MESSAGE = "the request exceeds the available context size, try increasing it"
# llama-cpp-python 0.3.36's error message for a `json_schema` response format (its request model takes
# text and json_object only), as it answered with HTTP 500 here, traceback included.
FORMAT_ERROR = (
    "1 validation error:\n  {'type': 'literal_error', 'loc': ('body', 'response_format', 'type'), 'msg': "
    "\"Input should be 'text' or 'json_object'\", 'input': 'json_schema', 'ctx': {'expected': \"'text' or "
    '\'json_object\'"}}\n\n  File "/venv/lib/python3.11/site-packages/llama_cpp/server/app.py", line 376, in '
    "create_chat_completion\n    POST /v1/chat/completions"
)
# What the teacher quotes of it.
FORMAT_MESSAGE = "response_format.type: Input should be 'text' or 'json_object'"
PROMPT_TOKENS = 100
COMPLETION_TOKENS = 20
RETRY_AFTER_S = 1

FINDING_KEYWORDS = {
    "Atelectasis": ("atelecta",),
    "Cardiomegaly": ("cardiomegaly",),
    "Consolidation": ("consolidation",),
    "Edema": ("edema",),
    "Enlarged Cardiomediastinum": ("mediastin",),
    "Fracture": ("fracture",),
    "Infiltrate": ("infiltrat",),
    "Lung Lesion": ("nodule", "mass"),
    "Lung Opacity": ("opacit",),
    "Pleural Effusion": ("effusion",),
    "Pleural Thickening": ("pleural thickening",),
    "Pneumothorax": ("pneumothorax",),
}
NEGATIONS = ("no ", "without ", "negative for ")
HEDGES = ("possible", "cannot exclude", "may ")


def expected_labels(report_text: str) -> dict[str, str]:
    """What the fake model answers for a report: sentence-level keyword, negation and hedge cues."""
    labels: dict[str, str] = {}
    for sentence in re.split(r"[.\n]", report_text.lower()):
        status = (
            "absent"
            if any(cue in f" {sentence}" for cue in NEGATIONS)
            else "uncertain"
            if any(cue in sentence for cue in HEDGES)
            else "present"
        )
        for finding, keywords in FINDING_KEYWORDS.items():
            if any(keyword in sentence for keyword in keywords):
                labels.setdefault(finding, status)
    return apply_no_finding_rule(labels)


@dataclass
class RecordedRequest:
    """One request as the server saw it."""

    number: int
    report: str
    authorization: str
    body: dict[str, Any]
    fault: str | None
    received_at: float  # time.monotonic()


class FakeOpenAI:
    """Chat Completions server on 127.0.0.1 (free port) with faults per request number or per report.

    ``fault_on_report(marker, *faults)`` applies the faults, in order, to the next requests whose
    user message contains ``marker``; ``fault_on_request(n, fault)`` to the n-th request (1-based).
    ``latency_s`` delays every answer (error answers come at once); a ``slow`` answer waits ``slow_s``.
    ``refuse_formats`` makes it a server without some structured output: "json_schema" (as
    llama-cpp-python), "schema" (a `json_object` with a schema, as OpenAI itself).
    """

    def __init__(
        self,
        slow_s: float = 1.5,
        latency_s: float = 0.0,
        echo_key_on_401: bool = True,
        refuse_formats: tuple[str, ...] = (),
    ) -> None:
        self.slow_s = slow_s
        self.refuse_formats = refuse_formats  # response formats answered with HTTP 500: "json_schema", "schema"
        self.latency_s = latency_s
        self.echo_key_on_401 = echo_key_on_401
        self.requests: list[RecordedRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._faults_by_number: dict[int, str] = {}
        self._faults_by_marker: dict[str, deque[str]] = defaultdict(deque)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self._server.fake = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="fake-openai", daemon=True
        )

    @property
    def url(self) -> str:
        """Base URL to give the OpenAI client."""
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def fault_on_request(self, number: int, fault: str) -> None:
        self._faults_by_number[number] = _checked(fault)

    def fault_on_report(self, marker: str, *faults: str) -> None:
        self._faults_by_marker[marker].extend(_checked(f) for f in faults)

    def requests_for(self, marker: str) -> list[RecordedRequest]:
        """Requests whose report contains ``marker``."""
        return [r for r in self.requests if marker in r.report]

    def start(self) -> FakeOpenAI:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _admit(self, report: str, authorization: str, body: dict[str, Any]) -> RecordedRequest:
        """Record a request and pick its fault (request-number faults win over report faults)."""
        with self._lock:
            number = len(self.requests) + 1
            fault = self._faults_by_number.pop(number, None)
            if fault is None:
                queue = next((q for marker, q in self._faults_by_marker.items() if marker in report and q), None)
                fault = queue.popleft() if queue else None
            request = RecordedRequest(number, report, authorization, body, fault, time.monotonic())
            self.requests.append(request)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return request

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1


def _checked(fault: str) -> str:
    if fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}; choose from {FAULTS}")
    return fault


def _completion(model: str, content: str) -> dict[str, Any]:
    """A Chat Completions response body in OpenAI's format."""
    return {
        "id": f"chatcmpl-fake-{time.monotonic_ns()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": PROMPT_TOKENS,
            "completion_tokens": COMPLETION_TOKENS,
            "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
        },
    }


def _answer_content(report: str, fault: str | None) -> str:
    """The model's message content: the real labels, or a deliberately broken variant."""
    labels = expected_labels(report)
    if fault == "not_json":
        return "Sure! The report shows a small effusion and no pneumothorax."
    if fault == "missing_finding":
        labels.pop("Pneumothorax")
    if fault == "invalid_status":
        labels["Edema"] = "maybe"
    if fault == "no_finding":  # schema-valid, but No Finding contradicts a finding present
        labels["Cardiomegaly"], labels["No Finding"] = "present", "uncertain"
    return json.dumps({"labels": labels})


def _refused_format(response_format: dict[str, Any], refused: tuple[str, ...]) -> bool:
    kind = response_format.get("type")
    return (kind == "json_schema" and "json_schema" in refused) or (
        kind == "json_object" and "schema" in response_format and "schema" in refused
    )


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send_json(404, {"error": {"message": "not found", "type": "invalid_request_error"}})
            return
        fake: FakeOpenAI = self.server.fake  # type: ignore[attr-defined]
        # The report is the first user message; a correction asked after an answer comes later.
        report = next((m["content"] for m in body.get("messages", []) if m.get("role") == "user"), "")
        request = fake._admit(report, self.headers.get("Authorization", ""), body)
        try:
            self._respond(fake, request)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up first (timeout): nothing to answer
        finally:
            fake._leave()

    def _respond(self, fake: FakeOpenAI, request: RecordedRequest) -> None:
        fault = request.fault
        if _refused_format(request.body.get("response_format") or {}, fake.refuse_formats):
            self._send_json(500, {"error": {"message": FORMAT_ERROR, "type": "internal_server_error"}})
            return
        if fault == "drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault == "429":
            error = {"error": {"message": "Rate limit reached", "type": "rate_limit_error"}}
            self._send_json(429, error, {"Retry-After": str(RETRY_AFTER_S)})
            return
        if fault == "500":
            self._send_json(500, {"error": {"message": "internal error", "type": "server_error"}})
            return
        if fault == "503":
            self._send_json(503, {"error": {"message": "Loading model", "type": "unavailable_error"}})
            return
        if fault == "context":
            self._send_json(500, {"error": {"code": 500, "message": CONTEXT_MESSAGE, "type": "server_error"}})
            return
        if fault == "400":
            self._send_json(400, {"error": {"message": f"bad request: {request.report}", "type": "invalid"}})
            return
        if fault == "401":
            key = request.authorization.removeprefix("Bearer ") if fake.echo_key_on_401 else "***"
            self._send_json(401, {"error": {"message": f"Incorrect API key provided: {key}", "type": "auth"}})
            return
        time.sleep(fake.slow_s if fault == "slow" else fake.latency_s)
        content = _answer_content(request.report, fault)
        self._send_json(200, _completion(request.body.get("model", "fake"), content))

    def _send_json(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default per-request stderr lines."""


@contextmanager
def serve(**options: Any) -> Iterator[FakeOpenAI]:
    """Run a FakeOpenAI for the duration of a ``with`` block and shut it down cleanly."""
    fake = FakeOpenAI(**options).start()
    try:
        yield fake
    finally:
        fake.stop()
