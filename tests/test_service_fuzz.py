"""Schemathesis against the running label service: requests generated from the OpenAPI schema BentoML
serves (`/docs.json`), schema-conforming and schema-violating, for every documented endpoint; then /label
once more from the contract the guard enforces (`deberta_rad.serve.LabelRequest`, whose finding names
and threshold bounds the served schema does not carry, so that conforming requests reach the model);
then a few hand-written bodies a generator does not produce (NaN, a lone surrogate, deep nesting, other
content types). Every answer must be a 2xx or a 4xx, never a 5xx or a hang; and afterwards the service's
log must hold none of the texts that were sent (DESIGN.md section 3: report text never reaches a log).

The server is test_serving's (`deberta-rad serve` of a tiny registered student on a free loopback port),
started once more for this module. About 100 generated requests, derandomised, so a run is repeatable.
"""

from __future__ import annotations

import copy
import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient
from test_serving import HEADERS, MAX_CHARS, MAX_REPORTS, Server, registered, server  # noqa: F401 (fixtures)

from deberta_rad.schema import FINDINGS
from deberta_rad.serve import LabelRequest, RequestGuard

# Generated examples per operation: /label is the contract worth fuzzing; /reload takes no input;
# the probes and /metrics take nothing, so a few calls each are all there is to try.
EXAMPLES = {"/label": 40, "/reload": 14}
EXAMPLES_OTHERWISE = 4
CONTRACT_EXAMPLES = 40
MIN_CHECKED_CHARS = 8  # shorter strings ("0", "ab") occur in any log by chance

SURROGATE_TEXT = b'"\\ud800 FUZZ-SURROGATE-3J9P"'
NESTED_ARRAYS = b"[" * 10_000 + b"]" * 10_000  # well past json.loads's recursion limit
NESTED_OBJECTS = b'{"a": ' * 5_000 + b"1" + b"}" * 5_000
JSON = "application/json"
# (path, content type, body): what JSON Schema generation does not produce. Each text is marked FUZZ-...
HAND_WRITTEN = [
    ("/label", JSON, b'{"reports": [{"report_id": "n", "text": "FUZZ-NAN-5T2W"}], "threshold": NaN}'),
    ("/label", JSON, b'{"reports": [{"report_id": "i", "text": "FUZZ-INF-8R4D"}], "threshold": Infinity}'),
    ("/label", JSON, b'{"reports": [{"report_id": "s", "text": ' + SURROGATE_TEXT + b"}]}"),
    ("/label", JSON, b'{"reports": [{"report_id": "q", "text": "FUZZ-STRING-THRESHOLD"}], "threshold": "0.5"}'),
    ("/label", JSON, b'{"reports": [{"report_id": "b", "text": "FUZZ-BOOL-THRESHOLD"}], "threshold": true}'),
    ("/label", JSON, b'{"reports": [{"report_id": "d", "text": "FUZZ-DUPLICATE-KEY-1"}], "reports": 5}'),
    ("/label", JSON, b'{"reports": 5, "reports": [{"report_id": "e", "text": "FUZZ-DUPLICATE-KEY-2"}]}'),
    ("/label", JSON, NESTED_ARRAYS),
    ("/label", JSON, NESTED_OBJECTS),
    ("/label", JSON, b"\xff\xfe FUZZ-NOT-UTF8"),
    ("/label", JSON, b""),
    ("/label", JSON, b"null"),
    ("/label", "text/plain", b'{"reports": [{"report_id": "t", "text": "FUZZ-TEXT-PLAIN-CT"}]}'),
    ("/label", "application/x-www-form-urlencoded", b"reports=FUZZ-FORM-BODY-77"),
    (
        "/label",
        "multipart/form-data; boundary=x",
        b'--x\r\nContent-Disposition: form-data; name="reports"\r\n\r\nFUZZ-MULTIPART\r\n--x--',
    ),
    ("/reload", JSON, b'"FUZZ-RELOAD-STRING-BODY"'),
    ("/reload", JSON, b'["FUZZ-RELOAD-ARRAY-BODY"]'),
    ("/reload", JSON, b'{"x": "FUZZ-RELOAD-OBJECT-BODY"}'),
    ("/reload", JSON, b"FUZZ-RELOAD-NOT-JSON"),
    ("/reload", JSON, NESTED_ARRAYS),
]
REQUEST_TIMEOUT_S = 60


def strings_in(value: Any) -> Iterator[str]:
    """Every string value in a generated body (object keys left out: they are field names, not text)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, bytes):
        yield value.decode("utf-8", errors="replace")
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings_in(item)


def contract_schema(served: dict[str, Any]) -> dict[str, Any]:
    """The served schema with /label's body replaced by the contract the guard enforces: LabelRequest's
    JSON schema, findings named from the 13, and the test server's limits."""
    spec = copy.deepcopy(served)
    body = LabelRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    report = body.pop("$defs")["ReportIn"]
    report["properties"]["text"]["maxLength"] = MAX_CHARS
    spec["components"]["schemas"]["ReportIn"] = report
    body["properties"]["reports"]["maxItems"] = MAX_REPORTS
    body["properties"]["findings"]["anyOf"][0]["items"] = {"type": "string", "enum": list(FINDINGS)}
    spec["paths"] = {"/label": spec["paths"]["/label"]}
    spec["paths"]["/label"]["post"]["requestBody"]["content"] = {"application/json": {"schema": body}}
    return spec


def leaked(text: str, log: str) -> bool:
    """The text in the log as sent, or as JSON or a Python repr would escape it."""
    forms = {text, json.dumps(text)[1:-1], json.dumps(text, ensure_ascii=False)[1:-1], repr(text)[1:-1]}
    return any(form in log for form in forms if len(form) >= MIN_CHECKED_CHARS)


# ----------------------------------------------------------------------------------------------
# What the fuzzer found, pinned on the guard alone (no server)
# ----------------------------------------------------------------------------------------------


def guarded_echo() -> TestClient:
    """The guard in front of an app that answers with the body it was handed."""

    async def echo(request: Request) -> JSONResponse:
        return JSONResponse({"body": (await request.body()).decode()})

    routes = [Route(path, echo, methods=["POST"]) for path in ("/label", "/reload")]
    return TestClient(RequestGuard(Starlette(routes=routes), api_key="k", max_reports=2, max_chars=10))


@pytest.mark.parametrize("path", ["/label", "/reload"])
@pytest.mark.parametrize("body", [NESTED_ARRAYS, NESTED_OBJECTS], ids=["arrays", "objects"])
def test_json_nested_too_deeply_is_a_400_not_a_crash(path: str, body: bytes) -> None:
    """json.loads raises RecursionError, not JSONDecodeError, past about a thousand levels: the request hung."""
    answer = guarded_echo().post(path, content=body, headers={"X-API-Key": "k", "Content-Type": JSON})
    assert answer.status_code == 400 and "nested too deeply" in answer.json()["error"]


@pytest.mark.parametrize(
    ("body", "status"),
    [(b"", 200), (b"{}", 200), (b'{"x": "FUZZ-OBJECT-1"}', 200), (b'"FUZZ-STRING-1"', 422), (b"[1]", 422), (b"x", 400)],
)
def test_reload_takes_no_body_and_the_app_never_sees_one(body: bytes, status: int) -> None:
    """BentoML logged a traceback quoting a /reload body it could not parse: the guard answers those itself
    and hands the app an empty body."""
    answer = guarded_echo().post("/reload", content=body, headers={"X-API-Key": "k", "Content-Type": JSON})
    assert answer.status_code == status
    assert b"FUZZ" not in answer.content
    if status == 200:
        assert answer.json() == {"body": ""}


# ----------------------------------------------------------------------------------------------
# The real server
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_generated_requests_get_no_5xx_and_leave_no_text_in_the_log(server: Server) -> None:  # noqa: F811
    served = requests.get(f"{server.url}/docs.json", timeout=30).json()
    operations = [result.ok() for result in schemathesis.openapi.from_dict(served).get_all_operations()]
    documented = {op.path for op in operations}
    assert {"/label", "/reload", "/readyz", "/livez", "/metrics"} <= documented, documented
    (contract_label,) = [
        result.ok() for result in schemathesis.openapi.from_dict(contract_schema(served)).get_all_operations()
    ]

    sent: list[str] = []
    answers: Counter[tuple[str, int]] = Counter()
    server_errors: list[str] = []
    session = requests.Session()

    def record(label: str, body: Any, send: Callable[[], requests.Response]) -> None:
        """Send, count the answer by status, and keep any 5xx or hang (with the body's shape, not its text)."""
        shape = body[:60] if isinstance(body, bytes) else type(body).__name__
        try:
            response = send()
        except requests.Timeout:
            answers[(label, 0)] += 1
            server_errors.append(f"{label} -> no answer within {REQUEST_TIMEOUT_S} s (body {shape!r})")
            return
        answers[(label, response.status_code)] += 1
        if response.status_code >= 500:
            server_errors.append(f"{label} -> {response.status_code} {response.text[:300]!r} (body {shape!r})")

    def fuzz(operation: schemathesis.APIOperation, max_examples: int, label: str) -> None:
        strategy = operation.as_strategy()
        if operation.body:  # negative cases need something to break; the GET endpoints take nothing
            strategy = st.one_of(strategy, operation.as_strategy(GenerationMode.NEGATIVE))

        @settings(
            max_examples=max_examples,
            derandomize=True,
            database=None,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy)
        def call(case: schemathesis.Case) -> None:
            if case.body is not None:
                sent.extend(strings_in(case.body))
            call_case = partial(case.call, server.url, session, HEADERS, timeout=REQUEST_TIMEOUT_S)
            record(label, case.body, call_case)

        call()

    for operation in operations:
        fuzz(operation, EXAMPLES.get(operation.path, EXAMPLES_OTHERWISE), operation.label)
    fuzz(contract_label, CONTRACT_EXAMPLES, "POST /label (contract)")

    for path, content_type, body in HAND_WRITTEN:
        headers = HEADERS | {"Content-Type": content_type}
        post = partial(session.post, f"{server.url}{path}", data=body, headers=headers, timeout=REQUEST_TIMEOUT_S)
        record(f"POST {path} ({content_type}, hand-written)", body, post)
        sent.extend(match.decode() for match in re.findall(rb"FUZZ-[A-Z0-9-]+", body))

    # The service still answers after all that.
    ok = session.post(
        f"{server.url}/label",
        json={"reports": [{"report_id": "r", "text": "Clear."}]},
        headers=HEADERS,
        timeout=REQUEST_TIMEOUT_S,
    )
    assert ok.status_code == 200, ok.text

    summary = ", ".join(f"{label} {status}: {n}" for (label, status), n in sorted(answers.items()))
    print(f"\n{sum(answers.values())} requests: {summary}")
    assert sum(answers.values()) >= 80, summary
    assert not server_errors, "\n".join(server_errors)

    log = server.log.read_text(encoding="utf-8", errors="replace")
    assert "input_value" not in log, "a validation traceback with the request's content reached the log"
    checked = sorted({text for text in sent if len(text) >= MIN_CHECKED_CHARS})
    assert len(checked) >= 20, "the fuzzer sent too few texts to check the log with"
    in_log = [text for text in checked if leaked(text, log)]
    assert not in_log, f"{len(in_log)} of {len(checked)} sent texts are in the service log, e.g. {in_log[:3]!r}"
