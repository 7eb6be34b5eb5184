"""A real local HTTP server that speaks the Chat Completions protocol and injects faults on demand.

The LLM teacher is tested against real sockets rather than a mocked SDK, so retries, timeouts and
dropped connections go through the same HTTP stack they meet in production. Answers are computed
deterministically from the report text (keywords plus negation/hedge cues), so tests can check that
every report ends up with exactly what the server answered.
"""

from __future__ import annotations

import email.policy
import json
import re
import socket
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.parser import BytesParser
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
NOT_FOUND = {"error": {"message": "not found", "type": "invalid_request_error"}}
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
    via_batch: bool = False  # a line of a batch, not a request of its own


class FakeOpenAI:
    """Chat Completions server on 127.0.0.1 (free port) with faults per request number or per report.

    ``fault_on_report(marker, *faults)`` applies the faults, in order, to the next requests whose
    user message contains ``marker``; ``fault_on_request(n, fault)`` to the n-th request (1-based).
    ``latency_s`` delays every answer (error answers come at once); a ``slow`` answer waits ``slow_s``.
    ``refuse_formats`` makes it a server without some structured output: "json_schema" (as
    llama-cpp-python), "schema" (a `json_object` with a schema, as OpenAI itself).

    With ``batch_api`` it also serves OpenAI's Files and Batches API (``/v1/files``, ``/v1/batches``): a
    batch answers ``in_progress`` to its first ``batch_polls - 1`` retrievals, then runs every line through
    the same answers and faults as a request of its own (non-200 answers go to the error file, as OpenAI
    does); ``fail_batches`` fails every batch's validation with that message.
    """

    def __init__(
        self,
        slow_s: float = 1.5,
        latency_s: float = 0.0,
        echo_key_on_401: bool = True,
        refuse_formats: tuple[str, ...] = (),
        batch_api: bool = True,
        batch_polls: int = 2,
    ) -> None:
        self.batch_api = batch_api
        self.batch_polls = batch_polls
        self.fail_batches: str | None = None
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.batch_calls: list[str] = []  # "POST /v1/files", "GET /v1/batches/batch_1", ... in order
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

    def batch_call(self, method: str, path: str, raw: bytes, content_type: str) -> tuple[int, Any]:
        """Answer a Files or Batches API call: (status, JSON payload or a file's bytes)."""
        with self._lock:
            self.batch_calls.append(f"{method} {path}")
        parts = path.split("/")  # "", "v1", "files" | "batches", id, "content"
        if method == "POST" and path == "/v1/files":
            return 200, self._upload(raw, content_type)
        if method == "POST" and path == "/v1/batches":
            return 200, self._create_batch(json.loads(raw))
        known = len(parts) > 3 and parts[3] in (self.files if parts[2] == "files" else self.batches)
        if not known:
            return 404, NOT_FOUND
        if method == "GET" and parts[2] == "files" and parts[4:] == ["content"]:
            return 200, self.files[parts[3]]
        if method == "DELETE" and parts[2] == "files":
            del self.files[parts[3]]
            return 200, {"id": parts[3], "object": "file", "deleted": True}
        if method == "GET" and parts[2] == "batches" and len(parts) == 4:
            return 200, self._retrieve_batch(parts[3])
        return 404, NOT_FOUND

    def _upload(self, raw: bytes, content_type: str) -> dict[str, Any]:
        """Store a multipart upload's `file` part, as POST /v1/files does."""
        form = BytesParser(policy=email.policy.default).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + raw
        )
        fields = {part.get_param("name", header="content-disposition"): part for part in form.iter_parts()}
        data = fields["file"].get_payload(decode=True)
        file_id = f"file-{len(self.files) + len(self.batches) + 1}-{time.monotonic_ns()}"
        self.files[file_id] = data
        return {
            "id": file_id,
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": fields["file"].get_filename(),
            "purpose": fields["purpose"].get_content().strip(),
            "status": "processed",
        }

    def _store(self, lines: list[dict[str, Any]]) -> str | None:
        if not lines:
            return None
        file_id = f"file-out-{time.monotonic_ns()}"
        self.files[file_id] = "".join(json.dumps(line) + "\n" for line in lines).encode()
        return file_id

    def _create_batch(self, body: dict[str, Any]) -> dict[str, Any]:
        lines = self.files[body["input_file_id"]].decode().splitlines()
        batch_id = f"batch_{len(self.batches) + 1}"
        self.batches[batch_id] = {
            "id": batch_id,
            "object": "batch",
            "endpoint": body["endpoint"],
            "input_file_id": body["input_file_id"],
            "completion_window": body["completion_window"],
            "status": "validating",
            "created_at": int(time.time()),
            "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
            "metadata": body.get("metadata"),
            "polls": 0,
        }
        return self._public(batch_id)

    def _public(self, batch_id: str) -> dict[str, Any]:
        return {key: value for key, value in self.batches[batch_id].items() if key != "polls"}

    def _retrieve_batch(self, batch_id: str) -> dict[str, Any]:
        """Progress on early retrievals; then the batch runs, once, and stays completed (or failed)."""
        batch = self.batches[batch_id]
        batch["polls"] += 1
        if batch["status"] in ("validating", "in_progress") and batch["polls"] >= self.batch_polls:
            self._run_batch(batch)
        elif batch["status"] == "validating":
            batch["status"] = "in_progress"
        return self._public(batch_id)

    def _run_batch(self, batch: dict[str, Any]) -> None:
        if self.fail_batches is not None:
            batch["status"] = "failed"
            error = {"code": "invalid_request", "message": self.fail_batches, "param": None, "line": 1}
            batch["errors"] = {"object": "list", "data": [error]}
            return
        outputs, errors = [], []
        for number, text in enumerate(self.files[batch["input_file_id"]].decode().splitlines()):
            line = json.loads(text)
            request = self._admit(_report_of(line["body"]), "", line["body"], via_batch=True)
            reply = _reply(self, request)
            self._leave()
            answer: dict[str, Any] = {"id": f"batch_req_{number}", "custom_id": line["custom_id"]}
            if reply is None:
                errors.append(answer | {"response": None, "error": {"code": "server_error", "message": "dropped"}})
            else:
                response = {"status_code": reply[0], "request_id": f"req_{number}", "body": reply[1]}
                (outputs if reply[0] == 200 else errors).append(answer | {"response": response, "error": None})
        batch["status"] = "completed"
        batch["request_counts"] = {
            "total": len(outputs) + len(errors),
            "completed": len(outputs),
            "failed": len(errors),
        }
        batch["output_file_id"], batch["error_file_id"] = self._store(outputs), self._store(errors)

    def _admit(self, report: str, authorization: str, body: dict[str, Any], via_batch: bool = False) -> RecordedRequest:
        """Record a request and pick its fault (request-number faults win over report faults)."""
        with self._lock:
            number = len(self.requests) + 1
            fault = self._faults_by_number.pop(number, None)
            if fault is None:
                queue = next((q for marker, q in self._faults_by_marker.items() if marker in report and q), None)
                fault = queue.popleft() if queue else None
            request = RecordedRequest(number, report, authorization, body, fault, time.monotonic(), via_batch)
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


def _reply(fake: FakeOpenAI, request: RecordedRequest) -> tuple[int, dict[str, Any], dict[str, str]] | None:
    """A chat completion's status, body and headers for a request and its fault (None: drop the connection)."""
    fault = request.fault
    if _refused_format(request.body.get("response_format") or {}, fake.refuse_formats):
        return 500, {"error": {"message": FORMAT_ERROR, "type": "internal_server_error"}}, {}
    if fault == "drop":
        return None
    errors: dict[str, tuple[int, str, str]] = {
        "429": (429, "Rate limit reached", "rate_limit_error"),
        "500": (500, "internal error", "server_error"),
        "503": (503, "Loading model", "unavailable_error"),
        "context": (500, CONTEXT_MESSAGE, "server_error"),
        "400": (400, f"bad request: {request.report}", "invalid"),
    }
    if fault == "401":
        key = request.authorization.removeprefix("Bearer ") if fake.echo_key_on_401 else "***"
        errors["401"] = (401, f"Incorrect API key provided: {key}", "auth")
    if fault in errors:
        status, message, kind = errors[fault]
        headers = {"Retry-After": str(RETRY_AFTER_S)} if fault == "429" else {}
        return status, {"error": {"message": message, "type": kind}}, headers
    time.sleep(fake.slow_s if fault == "slow" else fake.latency_s)
    return 200, _completion(request.body.get("model", "fake"), _answer_content(request.report, fault)), {}


def _report_of(body: dict[str, Any]) -> str:
    """The report is the first user message; a correction asked after an answer comes later."""
    return next((m["content"] for m in body.get("messages", []) if m.get("role") == "user"), "")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        fake: FakeOpenAI = self.server.fake  # type: ignore[attr-defined]
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._batch_api_call("POST", raw)
            return
        body = json.loads(raw or b"{}")
        request = fake._admit(_report_of(body), self.headers.get("Authorization", ""), body)
        try:
            self._respond(request, _reply(fake, request))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up first (timeout): nothing to answer
        finally:
            fake._leave()

    def do_GET(self) -> None:
        self._batch_api_call("GET")

    def do_DELETE(self) -> None:
        self._batch_api_call("DELETE")

    def _batch_api_call(self, method: str, raw: bytes = b"") -> None:
        """The Files and Batches API, or 404 as a server without them answers."""
        fake: FakeOpenAI = self.server.fake  # type: ignore[attr-defined]
        if not fake.batch_api:
            self._send_json(404, NOT_FOUND)
            return
        status, payload = fake.batch_call(method, self.path.rstrip("/"), raw, self.headers.get("Content-Type", ""))
        if isinstance(payload, bytes):  # a file's content
            self._send_bytes(status, payload, "application/octet-stream")
        else:
            self._send_json(status, payload)

    def _respond(self, request: RecordedRequest, reply: tuple[int, dict[str, Any], dict[str, str]] | None) -> None:
        if reply is None:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._send_json(*reply)

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send_bytes(status, json.dumps(payload).encode(), "application/json", headers)

    def _send_bytes(self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
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
