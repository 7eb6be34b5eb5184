"""LLM teacher: pseudo-labels reports through any OpenAI-compatible Chat Completions endpoint.

One report per request, answers forced into a JSON schema and validated with pydantic; an answer
that is not JSON or breaks the schema is asked again (bounded), never guessed. How the schema is
imposed depends on the server (`json_schema`, llama-cpp-python's `json_object` with `schema`, or the
schema in the prompt): one cheap request probes it before the first run against an endpoint, and the
mode is kept in the cache. An answer whose No Finding contradicts its other findings is asked again
once with the contradiction named, then set by the rule. When the first reports all fail the same way
(the server refuses the request format, the context overflows), the run stops with the server's
message and the setting to change instead of retrying every report. Requests run
concurrently (bounded) with retries and backoff, under an optional per-run budget, or, with
``batch=True``, through the OpenAI Batch API at half the price (teachers/batch.py); every validated
answer is committed to a SQLite cache at once, so reruns and resumed runs only pay for what is new.

Privacy: reports are PHI. Logs and errors carry report ids, counts and HTTP statuses, never report
text, model output or the API key, and reports leave the machine only with an explicit opt-in.

Retries are done here, not by the SDK (the client gets ``max_retries=0``): the SDK does honour
``Retry-After``, but it cannot retry an answer that arrives fine yet breaks the schema, and its
retries are invisible to the budget and the run summary. Doing all retries in one loop treats
429 / 5xx / timeouts / dropped connections / invalid answers uniformly, counts every request against
the budget and keeps the policy testable.
"""

from __future__ import annotations

import asyncio
import email.utils
import importlib.resources
import json
import logging
import random
import re
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args
from urllib.parse import urlsplit

import openai
from openai.types.chat import ChatCompletion
from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError, field_validator
from tqdm import tqdm

from deberta_rad.data import text_hash
from deberta_rad.net import is_loopback_host
from deberta_rad.parallel import chunked
from deberta_rad.schema import FINDINGS, STATUSES, LabelRecord, Report, Status, TeacherInfo, apply_no_finding_rule
from deberta_rad.settings import get_settings
from deberta_rad.teachers.cache import CachedAnswer, LabelCache

log = logging.getLogger(__name__)

DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"
ALLOW_EXTERNAL_ENV = "DEBERTA_RAD_ALLOW_EXTERNAL_LLM"
NO_KEY_PLACEHOLDER = "not-needed"  # local servers ignore the key, but the SDK insists on one
RETRYABLE_STATUSES = frozenset({408, 409, 429})  # plus every 5xx
CONFIGURATION_STATUSES = frozenset({401, 403, 404})  # wrong key, model or URL: every request would fail
MAX_IDS_IN_ERROR = 20
# Distinct reports whose first attempts failed alike, with nothing labelled yet, that stop a run: a
# server that refuses the request format or overflows its context fails every report the same way.
FAIL_FAST_REPORTS = 3
MAX_SERVER_MESSAGE_CHARS = 300
# Reports a streamed run holds at a time (label_stream): OpenAI's limit of requests per Batch API batch.
STREAM_CHUNK_REPORTS = 50_000
# Structured-output modes, strictest first (the probe's order): OpenAI's JSON schema (OpenAI, Azure,
# vLLM, llama-server, Ollama >= 0.5); llama-cpp-python's json_object with a `schema`; a plain JSON
# object with the schema stated in the prompt, which any JSON mode takes.
ResponseMode = Literal["json_schema", "json_object", "prompt"]
RESPONSE_MODES: tuple[ResponseMode, ...] = get_args(ResponseMode)
# What the Batch API charges per token, against a request of its own (OpenAI and Azure OpenAI: half).
BATCH_PRICE_FACTOR = 0.5
PROBE_MESSAGES = [{"role": "user", "content": 'Answer with the JSON object {"ok": true}.'}]
_PROMPT_VERSION_PATTERN = re.compile(r"[A-Za-z0-9_.-]+")
# One error of a pydantic ValidationError as its repr prints it: {'type': ..., 'loc': (...), 'msg': ...}
_PYDANTIC_ERROR = re.compile(r"'loc': \((?P<loc>[^)]*)\), 'msg': (?P<q>['\"])(?P<msg>.*?)(?P=q)")
_KEY_LIKE = re.compile(r"\b(?:sk|key|token)-[A-Za-z0-9_*-]{6,}", re.IGNORECASE)


# ----------------------------------------------------------------------------------------------
# Errors (messages carry ids, counts and statuses only)
# ----------------------------------------------------------------------------------------------


class LLMTeacherError(RuntimeError):
    """Base of the LLM teacher's errors; ``summary`` says what the run achieved before it stopped."""

    def __init__(self, message: str, summary: RunSummary | None = None) -> None:
        super().__init__(message)
        self.summary = summary


class ExternalLLMNotAllowed(LLMTeacherError):
    """The endpoint is not on this machine and the user has not opted in to sending PHI there."""


class EndpointRejected(LLMTeacherError):
    """The endpoint refuses every request (key, model or URL wrong), so the run stops early."""


class BudgetExhausted(LLMTeacherError):
    """The per-run request or token budget ran out; what was labelled is cached, the rest is not."""


class LabelingFailed(LLMTeacherError):
    """Some reports got no valid answer within the retries; all others were labelled and cached."""


class SystematicFailure(LLMTeacherError):
    """The first reports all failed the same way and none succeeded: every other report would too."""


# ----------------------------------------------------------------------------------------------
# Prompt and answer schema
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """A versioned prompt: fixed instructions first, the report last, so providers cache the prefix."""

    version: str
    system: str
    user_template: str

    def messages(self, report_text: str, mode: ResponseMode = "json_schema") -> list[dict[str, str]]:
        """Chat messages for one report (str.replace, not format: reports may contain braces); in mode
        `prompt` the system message also states the JSON schema, which nothing else imposes."""
        system = self.system
        if mode == "prompt":
            system += "\n\nThe answer must follow this JSON schema:\n" + json.dumps(answer_json_schema())
        return [
            {"role": "system", "content": system},
            {"role": "user", "content": self.user_template.replace("{report}", report_text)},
        ]


def load_prompt(version: str) -> Prompt:
    """Read ``prompts/<version>.txt`` (sections ``### system`` and ``### user`` with ``{report}``)."""
    if not _PROMPT_VERSION_PATTERN.fullmatch(version):
        raise ValueError(f"invalid prompt version {version!r}")
    prompts = importlib.resources.files("deberta_rad.teachers") / "prompts"
    resource = prompts / f"{version}.txt"
    if not resource.is_file():
        available = sorted(p.name.removesuffix(".txt") for p in prompts.iterdir() if p.name.endswith(".txt"))
        raise ValueError(f"unknown prompt version {version!r}; available: {', '.join(available)}")
    text = resource.read_text(encoding="utf-8")
    match = re.fullmatch(r"\s*### system\n(?P<system>.*?)\n### user\n(?P<user>.*)", text, flags=re.DOTALL)
    if match is None or not match["user"].rstrip().endswith("{report}"):
        raise ValueError(f"prompt {version!r} must hold '### system' then '### user' ending in {{report}}")
    return Prompt(version, match["system"].strip(), match["user"].strip())


def answer_json_schema() -> dict[str, Any]:
    """The strict JSON schema of an answer: all 13 findings required, each an enum of the statuses."""
    status = {"type": "string", "enum": list(STATUSES)}
    labels = {
        "type": "object",
        "properties": {finding: status for finding in FINDINGS},
        "required": list(FINDINGS),
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {"labels": labels},
        "required": ["labels"],
        "additionalProperties": False,
    }


def response_format(mode: ResponseMode) -> dict[str, Any]:
    """The request's `response_format` for a structured-output mode."""
    if mode == "json_schema":
        return {
            "type": "json_schema",
            "json_schema": {"name": "chest_xray_labels", "strict": True, "schema": answer_json_schema()},
        }
    if mode == "json_object":
        return {"type": "json_object", "schema": answer_json_schema()}
    return {"type": "json_object"}


class LLMAnswer(BaseModel):
    """What every answer must be; anything else counts as invalid and is asked again."""

    model_config = ConfigDict(extra="forbid", strict=True)

    labels: dict[str, Status]

    @field_validator("labels")
    @classmethod
    def _exactly_the_findings(cls, labels: dict[str, Status]) -> dict[str, Status]:
        missing = [f for f in FINDINGS if f not in labels]
        unknown = [f for f in labels if f not in FINDINGS]
        if missing or unknown:
            raise ValueError(f"missing findings {missing} and {len(unknown)} unknown keys")
        return {f: labels[f] for f in FINDINGS}


# ----------------------------------------------------------------------------------------------
# Endpoint opt-in and retry policy
# ----------------------------------------------------------------------------------------------


def ensure_endpoint_allowed(base_url: str, allow_external: bool) -> None:
    """Refuse a non-local endpoint unless the user opted in: reports are PHI."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("the LLM base URL must be an http(s) URL such as http://localhost:8000/v1")
    if allow_external or is_loopback_host(parts.hostname):
        return
    raise ExternalLLMNotAllowed(
        f"refusing to send reports to {parts.hostname}: reports are protected health information and "
        f"that endpoint is not on this machine. If your agreements allow it, opt in with "
        f"{ALLOW_EXTERNAL_ENV}=true (environment or .env); otherwise point OPENAI_BASE_URL at a local "
        "server (e.g. http://localhost:8000/v1)."
    )


def backoff_delay(attempt: int, base_s: float, cap_s: float) -> float:
    """Exponential backoff with jitter: half of min(cap, base * 2**attempt) fixed, half random."""
    ceiling = min(cap_s, base_s * 2**attempt)
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """Seconds a server asks us to wait (``retry-after-ms``, ``retry-after`` seconds or HTTP date)."""
    if (millis := headers.get("retry-after-ms")) is not None:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_tz(value)
        return None if parsed is None else max(0.0, email.utils.mktime_tz(parsed) - time.time())


class RetryableFailure(Exception):
    """A failed attempt worth repeating (rate limit, server error, timeout, invalid answer).

    ``hint`` names the setting that fixes it where one does; ``systematic`` failures (not rate limits or
    answers asked again) count towards stopping a run whose first reports all fail alike."""

    def __init__(
        self,
        reason: str,
        retry_after_s: float | None = None,
        back_off: bool = True,
        hint: str = "",
        systematic: bool = True,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s
        self.back_off = back_off
        self.hint = hint
        self.systematic = systematic


class ReportRejected(Exception):
    """The endpoint rejects this one request (e.g. a report longer than the context): do not repeat."""

    def __init__(self, reason: str, hint: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.hint = hint


def server_message(body: object, report_text: str = "", api_key: str | None = None) -> str | None:
    """The error message a server gave (OpenAI's `error.message`, FastAPI's `detail`, a plain `message`),
    on one line and cut short; withheld when it quotes the report, since a server may echo the request,
    and with the API key (or anything shaped like one) masked, since a 401 may quote it."""
    message: object = body
    if isinstance(body, dict):
        error = body.get("error")
        message = (
            (error.get("message") if isinstance(error, dict) else error) or body.get("detail") or body.get("message")
        )
    if isinstance(message, list):  # FastAPI's validation errors: their `msg`, never their `input`
        message = "; ".join(str(item.get("msg", "")) if isinstance(item, dict) else str(item) for item in message)
    if not isinstance(message, str) or not message.strip():
        return None
    message = _readable(message)
    if api_key:
        message = message.replace(api_key, "***")
    message = _KEY_LIKE.sub("***", message)[:MAX_SERVER_MESSAGE_CHARS]
    return "(the server's message quotes the request; not shown)" if _quotes(message, report_text) else message


def _readable(message: str) -> str:
    """A server's message on one line: pydantic's errors as `field: message` (their `input` may hold the
    request), and without a Python traceback that a server appended (llama-cpp-python does)."""
    errors = [
        ".".join(part for part in re.findall(r"'([^']*)'", found["loc"]) if part != "body") + ": " + found["msg"]
        for found in _PYDANTIC_ERROR.finditer(message)
    ]
    if errors:
        return "; ".join(errors)
    return " ".join(message.split('  File "', 1)[0].split())


def _quotes(message: str, text: str, window: int = 20) -> bool:
    """Whether any `window` characters of the message occur in the text (both on one line, lower-case)."""
    flat, message = " ".join(text.split()).lower(), message.lower()
    if not flat or len(message) < window:
        return bool(flat) and message in flat
    return any(message[i : i + window] in flat for i in range(len(message) - window + 1))


def endpoint_hint(status: int | None, message: str | None) -> str:
    """The setting that fixes an error a server gives for its limits or the request format, if any."""
    text = (message or "").lower()
    if re.search(r"response_format|json_schema|json schema", text):
        return (
            "the server does not take this structured-output mode: set --llm-response-format (or "
            "DEBERTA_RAD_LLM_RESPONSE_FORMAT) to auto to probe again, or to json_object or prompt"
        )
    if re.search(r"context|n_ctx|too long|too many tokens|maximum .*length", text):
        return (
            "the prompt and answer do not fit the context the server gives one request: start it with a "
            "larger context (llama-server --ctx-size, shared by its --parallel slots; llama_cpp.server "
            "--n_ctx) or lower DEBERTA_RAD_LLM_CONCURRENCY"
        )
    if status == 503:
        return "the server is busy or still loading: lower DEBERTA_RAD_LLM_CONCURRENCY or wait for it"
    return ""


def _status_failure(err: openai.APIStatusError, model: str, report_text: str, api_key: str | None) -> Exception:
    """Classify an HTTP error answer: retry it, give up on this report, or stop the run."""
    return status_failure(err.status_code, err.body, model, report_text, api_key, err.response.headers)


def status_failure(
    status: int,
    body: object,
    model: str,
    report_text: str,
    api_key: str | None,
    headers: Mapping[str, str] | None = None,
) -> Exception:
    """Classify an error status and body, answered to a request or to a line of a batch."""
    message = server_message(body, report_text, api_key)
    reason = f"HTTP {status}" + (f": {message}" if message else "")
    if status in RETRYABLE_STATUSES or status >= 500:
        return RetryableFailure(
            reason,
            retry_after_s=retry_after_seconds(headers or {}),
            hint=endpoint_hint(status, message),
            systematic=status != 429,
        )
    if status in CONFIGURATION_STATUSES:
        return EndpointRejected(
            f"the LLM endpoint answered {reason} for model {model!r}: check OPENAI_API_KEY, "
            "OPENAI_BASE_URL (usually ending in /v1) and the model name"
        )
    return ReportRejected(reason, endpoint_hint(status, message))


def no_finding_contradiction(labels: Mapping[str, str]) -> str | None:
    """What is wrong with an answer's No Finding under the rule teacher's convention (DESIGN.md: present
    exactly when no other finding is present or uncertain, else not_mentioned), or None."""
    expected = apply_no_finding_rule(dict(labels))["No Finding"]
    given = labels["No Finding"]
    if given == expected:
        return None
    positive = [f for f in FINDINGS if f != "No Finding" and labels[f] in ("present", "uncertain")]
    if positive:
        return (
            f'"No Finding" is "{given}" while {", ".join(positive)} '
            f'{"is" if len(positive) == 1 else "are"} present or uncertain: it must then be "not_mentioned".'
        )
    return f'"No Finding" is "{given}" while no other finding is present or uncertain: it must then be "present".'


def _safe_location(loc: tuple[int | str, ...]) -> str:
    """Where a validation error sits, naming only schema keys: other keys are model output."""
    known = {"labels", *FINDINGS}
    return ".".join(str(part) if part in known else "<other key>" for part in loc) or "top level"


def _validation_reason(err: ValidationError) -> str:
    """Why an answer broke the schema, by error type and location only (no answer content)."""
    problems = sorted({f"{e['type']} at {_safe_location(e['loc'])}" for e in err.errors()})
    return "invalid answer: " + "; ".join(problems[:3])


def _completion_labels(completion: object) -> dict[str, str]:
    """Validated labels of a completion, or a retryable failure saying what was wrong with it."""
    if not isinstance(completion, ChatCompletion) or not completion.choices:
        raise RetryableFailure("malformed completion", back_off=False)
    choice = completion.choices[0]
    if choice.finish_reason == "length":
        raise RetryableFailure("answer cut off at the token limit", back_off=False)
    content = choice.message.content if choice.message else None
    if not content:
        raise RetryableFailure("empty answer or refusal", back_off=False)
    try:
        return dict(LLMAnswer.model_validate_json(content).labels)
    except ValidationError as err:
        raise RetryableFailure(_validation_reason(err), back_off=False) from None


def _correction_messages(labels: Mapping[str, str], contradiction: str) -> list[dict[str, str]]:
    """The previous answer (labels only) and what is wrong with it, for asking once again."""
    return [
        {"role": "assistant", "content": json.dumps({"labels": dict(labels)})},
        {"role": "user", "content": f"{contradiction} Answer again with the whole corrected JSON object."},
    ]


# ----------------------------------------------------------------------------------------------
# Run bookkeeping
# ----------------------------------------------------------------------------------------------


@dataclass
class RunSummary:
    """What one labelling run did and cost; cache hits count distinct report texts."""

    model: str
    prompt_version: str
    response_mode: str = "json_schema"
    response_mode_source: str = "set"  # set (by the user), cached (probed before) or probed (this run)
    reports: int = 0
    unique_texts: int = 0
    cache_hits: int = 0
    requests_sent: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated_cost_usd: float | None = None
    stopped_by_budget: bool = False
    no_finding_repaired: int = 0
    batch_ids: list[str] = field(default_factory=list)  # Batch API batches whose answers this run took in
    batch_prompt_tokens: int = 0  # the part of the tokens answered by batch, at BATCH_PRICE_FACTOR
    batch_completion_tokens: int = 0
    unlabelled_ids: list[str] = field(default_factory=list)
    failed_ids: list[str] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def describe(self) -> str:
        """One line for the end of a run: counts, tokens and cost."""
        cost = "unknown (no prices given)" if self.estimated_cost_usd is None else f"${self.estimated_cost_usd:.4f}"
        line = (
            f"LLM teacher {self.model} (prompt {self.prompt_version}, structured output {self.response_mode}, "
            f"{self.response_mode_source}): {self.reports} reports, "
            f"{self.unique_texts} distinct texts, {self.cache_hits} from cache, "
            f"{self.requests_sent} requests ({self.retries} retries), "
            f"tokens {self.prompt_tokens} prompt + {self.completion_tokens} completion, estimated cost {cost}"
        )
        if self.batch_ids:
            line += f"; by batch {', '.join(self.batch_ids)}"
        if self.no_finding_repaired:
            line += f"; No Finding set by the rule in {self.no_finding_repaired} answers that contradicted it"
        if self.unlabelled_ids:
            line += f"; {len(self.unlabelled_ids)} reports unlabelled"
        return line + (" (stopped by budget)" if self.stopped_by_budget else "")


class _PutOff:
    """A job's attempts deferred to the back of the queue."""


_PUT_OFF = _PutOff()


@dataclass
class LabelJob:
    """One distinct report text to label, and every report id that carries it."""

    text_hash: str
    text: str
    report_ids: list[str]
    correction: list[dict[str, str]] | None = None  # the last answer and its contradiction, to ask again
    put_off: bool = False  # its retries were deferred once while nothing was labelled (see _label_job)
    attempts: int = 0

    @property
    def log_id(self) -> str:
        """Report id(s) for logs (never the text)."""
        more = len(self.report_ids) - 1
        return self.report_ids[0] + (f" (+{more} with the same text)" if more else "")


@dataclass
class RunState:
    """Mutable state the workers share; one event loop, so no locks are needed."""

    summary: RunSummary
    max_requests: int | None
    max_tokens: int | None
    answers: dict[str, CachedAnswer]
    failed_hashes: set[str] = field(default_factory=set)
    fatal: LLMTeacherError | None = None
    labelled: int = 0  # answers received this run
    first_failures: dict[str, tuple[str, str]] = field(default_factory=dict)  # text hash: (reason, hint)
    resume_at: float = 0.0  # time.monotonic() before which no worker sends (server asked to wait)

    def pause_for(self, seconds: float) -> None:
        """Hold back every worker, not just the one told: Retry-After is about the client as a whole."""
        self.resume_at = max(self.resume_at, time.monotonic() + seconds)

    async def wait_if_paused(self) -> None:
        while (remaining := self.resume_at - time.monotonic()) > 0:
            await asyncio.sleep(remaining)

    def note_failure(self, text_hash: str, reason: str, hint: str) -> None:
        """Stop the run when its first FAIL_FAST_REPORTS distinct reports all failed the same way and
        nothing was labelled: every other report would fail alike, retries included."""
        if self.labelled or self.fatal is not None:
            return
        self.first_failures.setdefault(text_hash, (reason, hint))
        kinds = set(self.first_failures.values())
        if len(self.first_failures) >= FAIL_FAST_REPORTS and len(kinds) == 1:
            self.fatal = SystematicFailure(
                f"the first {len(self.first_failures)} reports all failed with {reason}, and none was labelled"
                + (f"; {hint}" if hint else "")
            )

    def may_send(self) -> bool:
        """Whether another request is allowed; flags a budget stop the first time it is not."""
        if self.fatal is not None:
            return False
        over_requests = self.max_requests is not None and self.summary.requests_sent >= self.max_requests
        over_tokens = self.max_tokens is not None and self.summary.total_tokens >= self.max_tokens
        if over_requests or over_tokens:
            self.summary.stopped_by_budget = True
            return False
        return True

    def add_usage(self, completion: object, batch: bool = False) -> tuple[int, int]:
        """Count a response's tokens (billed even when the answer is then rejected; at the batch price
        when it came from a batch)."""
        usage = getattr(completion, "usage", None)
        prompt = int(getattr(usage, "prompt_tokens", 0) or 0)
        completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
        self.summary.prompt_tokens += prompt
        self.summary.completion_tokens += completion_tokens
        if batch:
            self.summary.batch_prompt_tokens += prompt
            self.summary.batch_completion_tokens += completion_tokens
        return prompt, completion_tokens


def _group_by_text(reports: Sequence[Report], hashes: Sequence[str]) -> dict[str, LabelJob]:
    """One job per distinct text: identical reports (frequent "normal" reports) cost one request."""
    jobs: dict[str, LabelJob] = {}
    for report, digest in zip(reports, hashes, strict=True):
        if digest in jobs:
            jobs[digest].report_ids.append(report.report_id)
        else:
            jobs[digest] = LabelJob(digest, report.text, [report.report_id])
    return jobs


def _shown_ids(ids: Sequence[str]) -> str:
    """At most MAX_IDS_IN_ERROR ids for an error message, and how many more there are."""
    shown = ", ".join(ids[:MAX_IDS_IN_ERROR])
    return shown + (f" and {len(ids) - MAX_IDS_IN_ERROR} more" if len(ids) > MAX_IDS_IN_ERROR else "")


# ----------------------------------------------------------------------------------------------
# The teacher
# ----------------------------------------------------------------------------------------------


class LLMTeacher:
    """Labels reports with an OpenAI-compatible LLM; see the module docstring for the guarantees."""

    def __init__(
        self,
        model: str | None = None,
        cache_dir: Path | str | None = None,
        base_url: str | None = None,
        concurrency: int = 8,
        max_retries: int = 5,
        max_requests: int | None = None,
        max_tokens_budget: int | None = None,
        timeout_s: float = 60,
        prompt_version: str = "v2",
        price_per_1k_input: float | None = None,
        price_per_1k_output: float | None = None,
        backoff_base_s: float = 1.0,
        backoff_cap_s: float = 30.0,
        retry_after_cap_s: float = 60.0,
        response_format: ResponseMode | Literal["auto"] = "auto",
        batch: bool = False,
        batch_poll_s: float = 30.0,
    ) -> None:
        if concurrency < 1 or max_retries < 0 or timeout_s <= 0 or batch_poll_s <= 0:
            raise ValueError("need concurrency >= 1, max_retries >= 0, timeout_s > 0 and batch_poll_s > 0")
        if response_format != "auto" and response_format not in RESPONSE_MODES:
            raise ValueError(f"unknown response format {response_format!r}; choose auto or one of {RESPONSE_MODES}")
        settings = get_settings()
        self.model = model or settings.llm_model
        self.base_url = base_url or settings.openai_base_url or DEFAULT_OPENAI_BASE_URL
        ensure_endpoint_allowed(self.base_url, settings.allow_external_llm)
        self._api_key: SecretStr | None = settings.openai_api_key
        self.prompt = load_prompt(prompt_version)
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.max_requests = max_requests
        self.max_tokens_budget = max_tokens_budget
        self.timeout_s = timeout_s
        self.price_per_1k_input = price_per_1k_input
        self.price_per_1k_output = price_per_1k_output
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.retry_after_cap_s = retry_after_cap_s
        self.response_format = response_format
        self.batch = batch
        self.batch_poll_s = batch_poll_s
        self.info = TeacherInfo(name="llm", model=self.model, prompt_version=prompt_version)
        self.last_run: RunSummary | None = None

    def secret(self) -> str | None:
        """The API key's value, to mask it wherever a server's message might quote it."""
        return self._api_key.get_secret_value() if self._api_key else None

    def label(self, reports: Sequence[Report]) -> list[LabelRecord]:
        """Label every report, in input order; raises rather than return partial labels."""
        records, _ = self.label_with_usage(reports)
        return records

    def label_with_usage(self, reports: Sequence[Report]) -> tuple[list[LabelRecord], RunSummary]:
        """Like :meth:`label`, also returning the run summary (requests, tokens, cost)."""
        return asyncio.run(self.alabel_with_usage(reports))

    async def alabel_with_usage(self, reports: Sequence[Report]) -> tuple[list[LabelRecord], RunSummary]:
        """Async core, for callers already inside an event loop.

        Raises EndpointRejected, SystematicFailure, BudgetExhausted or LabelingFailed (all carrying the
        summary, also kept in ``last_run``) when any report stays unlabelled; every answer received is
        cached first.
        """
        summary = self._start_run()
        try:
            with LabelCache(self.cache_dir) as cache:
                return await self._label_chunk(reports, cache, summary), summary
        finally:
            log.info(summary.describe())

    def label_stream(self, reports: Iterable[Report], chunk_size: int = STREAM_CHUNK_REPORTS) -> Iterator[LabelRecord]:
        """Label reports as they stream, a chunk at a time, as one run: one request budget, one answer cache
        (a text answered in an earlier chunk is not asked again, even without a cache folder), one summary
        in ``last_run``; memory holds one chunk's reports. Like :meth:`label` it raises when a chunk is left
        incomplete, after yielding the records of the chunks before it (a Batch API run waits for each
        chunk's batches in turn)."""
        summary = self._start_run()
        try:
            with LabelCache(self.cache_dir) as cache:
                for chunk in chunked(reports, chunk_size):
                    yield from asyncio.run(self._label_chunk(chunk, cache, summary))
        finally:
            log.info(summary.describe())

    def _start_run(self) -> RunSummary:
        self.last_run = RunSummary(self.model, self.prompt.version)
        return self.last_run

    async def _label_chunk(
        self, reports: Sequence[Report], cache: LabelCache, summary: RunSummary
    ) -> list[LabelRecord]:
        """Label a run's next reports, adding to its summary (whose counts the budget reads)."""
        first = summary.reports == 0
        hashes = [text_hash(r.text) for r in reports]
        jobs = _group_by_text(reports, hashes)
        summary.reports += len(reports)
        summary.unique_texts += len(jobs)
        api_key = self.secret() or NO_KEY_PLACEHOLDER
        async with openai.AsyncOpenAI(
            base_url=self.base_url, api_key=api_key, max_retries=0, timeout=self.timeout_s
        ) as client:
            state = await self._label_uncached(client, cache, jobs, summary, first)
        self._finish_summary(reports, hashes, state)
        self._raise_if_incomplete(state)
        return self._records(reports, hashes, state.answers)

    async def _label_uncached(
        self, client: openai.AsyncOpenAI, cache: LabelCache, jobs: dict[str, LabelJob], summary: RunSummary, first: bool
    ) -> RunState:
        """Take what the cache holds for this endpoint's structured-output mode (settled on a run's first
        chunk), then ask for the rest."""
        state = RunState(summary, self.max_requests, self.max_tokens_budget, {})
        if not jobs:
            return state
        if first:
            summary.response_mode, summary.response_mode_source = await self._response_mode(client, cache)
        answers = cache.get_many(jobs, self.model, self.prompt.version, summary.response_mode)
        summary.cache_hits += len(answers)
        state.answers.update(answers)
        pending = [job for digest, job in jobs.items() if digest not in answers]
        if pending and self.batch:
            from deberta_rad.teachers.batch import label_by_batch

            await label_by_batch(self, client, cache, pending, state)
        elif pending:
            already_done = summary.reports - self._count(pending)
            await self._label_pending(client, pending, state, cache, already_done)
        if isinstance(state.fatal, SystematicFailure) and summary.response_mode_source == "cached":
            cache.put_endpoint_mode(self.base_url, self.model, None)  # the server may have changed: probe again
        return state

    async def _response_mode(self, client: openai.AsyncOpenAI, cache: LabelCache) -> tuple[ResponseMode, str]:
        """The structured-output mode to ask in, and where it came from: the user's setting, the cache,
        or a probe of the endpoint now (then kept in the cache)."""
        if self.response_format != "auto":
            return self.response_format, "set"
        cached = cache.endpoint_mode(self.base_url, self.model)
        if cached in RESPONSE_MODES:
            return cached, "cached"  # type: ignore[return-value]
        mode = await self._probe_response_mode(client)
        cache.put_endpoint_mode(self.base_url, self.model, mode)
        log.info(
            "LLM endpoint %s takes structured output %s for %s (probed, kept in the cache)",
            self.base_url,
            mode,
            self.model,
        )
        return mode, "probed"

    async def _probe_response_mode(self, client: openai.AsyncOpenAI) -> ResponseMode:
        """Ask a few tokens of a tiny JSON answer in each mode, strictest first; the first the server
        takes wins. No report is sent."""
        refusals = []
        for mode in RESPONSE_MODES:
            try:
                await client.chat.completions.create(
                    model=self.model,
                    messages=PROBE_MESSAGES,  # type: ignore[arg-type]
                    response_format=response_format(mode),  # type: ignore[arg-type]
                    max_tokens=8,
                    temperature=0,
                )
                return mode
            except openai.APIStatusError as err:
                failure = _status_failure(err, self.model, "", self.secret())
                if isinstance(failure, EndpointRejected):
                    raise failure from None
                message = server_message(err.body, "", self.secret())
                refusals.append(f"{mode}: HTTP {err.status_code}" + (f" ({message})" if message else ""))
            except (openai.APITimeoutError, openai.APIConnectionError):
                raise LLMTeacherError(
                    f"the LLM endpoint {self.base_url} did not answer a short request within {self.timeout_s:g} s "
                    "or refused the connection: is the server running there (OPENAI_BASE_URL, usually ending "
                    "in /v1)? A slow server needs a larger DEBERTA_RAD_LLM_TIMEOUT_S"
                ) from None
        raise EndpointRejected(
            f"the LLM endpoint {self.base_url} took none of the structured-output modes ({'; '.join(refusals)}): "
            "check that it serves OpenAI chat completions for this model"
        )

    @staticmethod
    def _count(jobs: Sequence[LabelJob]) -> int:
        return sum(len(job.report_ids) for job in jobs)

    async def _label_pending(
        self,
        client: openai.AsyncOpenAI,
        pending: list[LabelJob],
        state: RunState,
        cache: LabelCache,
        already_done: int,
    ) -> None:
        """Run ``concurrency`` workers over the pending jobs, with a progress bar over reports."""
        log.info(
            "LLM teacher: %d distinct texts to request (%d from cache)",
            len(pending),
            state.summary.cache_hits,
        )
        jobs = deque(pending)  # shared by the workers: each job is taken by one of them at a time
        with tqdm(
            total=state.summary.reports, initial=already_done, unit="report", desc="LLM labels", disable=None
        ) as progress:
            workers = [self._worker(client, jobs, state, cache, progress) for _ in range(self.concurrency)]
            await asyncio.gather(*workers)

    async def _worker(
        self,
        client: openai.AsyncOpenAI,
        jobs: deque[LabelJob],
        state: RunState,
        cache: LabelCache,
        progress: tqdm,
    ) -> None:
        """Take jobs one at a time until none is left or the run must stop; a job put off (see
        _label_job) goes to the back of the queue."""
        while jobs:
            job = jobs.popleft()
            if not state.may_send():
                return
            try:
                answer = await self._label_job(client, job, state)
            except EndpointRejected as err:
                state.fatal = state.fatal or err
                return
            if answer is _PUT_OFF:
                jobs.append(job)
                continue
            if answer is None:
                continue
            state.answers[job.text_hash] = answer
            state.labelled += 1
            cache.put(job.text_hash, self.model, self.prompt.version, state.summary.response_mode, answer)
            progress.update(len(job.report_ids))

    async def _label_job(
        self, client: openai.AsyncOpenAI, job: LabelJob, state: RunState
    ) -> CachedAnswer | _PutOff | None:
        """Ask until a valid answer arrives; None when retries, the budget or a stop end the attempts.

        While nothing is labelled yet, a report whose second attempt failed too is put off (once) rather than
        retried on: other reports then show soon whether every report fails that way (the run stops,
        RunState.note_failure) or only this one (it gets its retries later)."""
        reason = "not attempted"
        while (attempt := job.attempts) <= self.max_retries:
            job.attempts += 1
            await state.wait_if_paused()
            if not state.may_send():
                return None
            if attempt:
                state.summary.retries += 1
            try:
                return await self._request(client, job, state, may_ask_again=attempt < self.max_retries)
            except RetryableFailure as failure:
                reason, delay = failure.reason + (f" ({failure.hint})" if failure.hint else ""), 0.0
                if failure.systematic:
                    state.note_failure(job.text_hash, failure.reason, failure.hint)
                if state.fatal is not None:
                    break
                if failure.systematic and attempt and not state.labelled and not job.put_off:
                    log.warning("report %s: %s again; trying other reports before retrying it", job.log_id, reason)
                    job.put_off = True
                    return _PUT_OFF
                delay = self._retry_delay(failure, attempt)
                if failure.retry_after_s is not None:
                    state.pause_for(delay)
            except ReportRejected as rejection:
                state.note_failure(job.text_hash, rejection.reason, rejection.hint)
                hint = f" ({rejection.hint})" if rejection.hint else ""
                log.error(
                    "report %s: the endpoint rejected the request (%s)%s; not retrying", job.log_id, rejection, hint
                )
                state.failed_hashes.add(job.text_hash)
                return None
            if attempt < self.max_retries:
                log.warning(
                    "report %s: %s (attempt %d of %d); retrying in %.1f s",
                    job.log_id,
                    reason,
                    attempt + 1,
                    self.max_retries + 1,
                    delay,
                )
                await asyncio.sleep(delay)
        if state.fatal is not None:
            return None
        log.error(
            "report %s: no valid answer after %d attempts (last: %s)",
            job.log_id,
            self.max_retries + 1,
            reason,
        )
        state.failed_hashes.add(job.text_hash)
        return None

    async def _request(
        self, client: openai.AsyncOpenAI, job: LabelJob, state: RunState, may_ask_again: bool
    ) -> CachedAnswer:
        """Send one request; return the validated answer or raise a classified failure. An answer whose
        No Finding contradicts its findings is asked again once, with the contradiction named (when
        ``may_ask_again``), and is otherwise set by the rule and counted.

        SDK exceptions are translated here and not chained (``from None``): their messages may quote
        the response body, which can echo the request, and none of it belongs in logs or errors; the
        server's own error message is quoted only when it does not quote the report.
        """
        state.summary.requests_sent += 1
        try:
            completion = await client.chat.completions.create(**self.request_body(job, state.summary.response_mode))
        except openai.APITimeoutError:
            raise RetryableFailure(
                f"no answer within {self.timeout_s:g} s",
                hint="raise DEBERTA_RAD_LLM_TIMEOUT_S, or lower DEBERTA_RAD_LLM_CONCURRENCY to what the server "
                "answers at once (a local server works on a few requests at a time)",
            ) from None
        except openai.APIConnectionError:
            raise RetryableFailure(
                "connection failed or dropped", hint=f"is the server running at {self.base_url}?"
            ) from None
        except openai.APIStatusError as err:
            raise _status_failure(err, self.model, job.text, self.secret()) from None
        except (openai.APIError, ValueError):
            raise RetryableFailure("malformed response body") from None
        return self.answer(completion, job, state, may_ask_again)

    def request_body(self, job: LabelJob, mode: ResponseMode) -> dict[str, Any]:
        """One report's Chat Completions request (with the correction asked after a contradiction)."""
        return {
            "model": self.model,
            "messages": [*self.prompt.messages(job.text, mode), *(job.correction or [])],
            "response_format": response_format(mode),
            "temperature": 0,
        }

    @staticmethod
    def answer(
        completion: object, job: LabelJob, state: RunState, may_ask_again: bool, batch: bool = False
    ) -> CachedAnswer:
        """The validated answer of a completion, or a retryable failure; an answer whose No Finding
        contradicts its findings is asked again once with the contradiction named (``may_ask_again``),
        else set by the rule and counted."""
        prompt_tokens, completion_tokens = state.add_usage(completion, batch)
        labels = _completion_labels(completion)
        contradiction = no_finding_contradiction(labels)
        if contradiction is not None:
            if job.correction is None and may_ask_again:
                job.correction = _correction_messages(labels, contradiction)
                raise RetryableFailure("No Finding contradicts the other findings", back_off=False, systematic=False)
            labels = apply_no_finding_rule(labels)
            state.summary.no_finding_repaired += 1
        return CachedAnswer(labels, prompt_tokens, completion_tokens)

    def _retry_delay(self, failure: RetryableFailure, attempt: int) -> float:
        """Server's Retry-After (capped) when given, else jittered backoff; invalid answers retry at once."""
        if failure.retry_after_s is not None:
            return min(failure.retry_after_s, self.retry_after_cap_s)
        if not failure.back_off:
            return 0.0
        return backoff_delay(attempt, self.backoff_base_s, self.backoff_cap_s)

    def _finish_summary(self, reports: Sequence[Report], hashes: Sequence[str], state: RunState) -> None:
        """Fill in cost and the ids left without labels."""
        summary = state.summary
        if self.price_per_1k_input is not None and self.price_per_1k_output is not None:
            discount = 1 - BATCH_PRICE_FACTOR
            prompt_tokens = summary.prompt_tokens - discount * summary.batch_prompt_tokens
            completion_tokens = summary.completion_tokens - discount * summary.batch_completion_tokens
            summary.estimated_cost_usd = (
                prompt_tokens * self.price_per_1k_input + completion_tokens * self.price_per_1k_output
            ) / 1000
        pairs = list(zip(reports, hashes, strict=True))
        summary.unlabelled_ids = [r.report_id for r, h in pairs if h not in state.answers]
        summary.failed_ids = [r.report_id for r, h in pairs if h in state.failed_hashes]

    @staticmethod
    def _raise_if_incomplete(state: RunState) -> None:
        """Nothing is dropped silently: any unlabelled report ends the run with a clear error."""
        summary = state.summary
        if not summary.unlabelled_ids:
            return
        labelled = summary.reports - len(summary.unlabelled_ids)
        progress = f"{labelled} of {summary.reports} reports are labelled and cached; a rerun resumes from there"
        if state.fatal is not None:
            # A rerun sends only the reports left, but fails the same way until the cause is fixed.
            cached = f"{labelled} of {summary.reports} reports are labelled and cached"
            raise type(state.fatal)(f"{state.fatal} ({cached}; a rerun fails alike until that is fixed)", summary)
        if summary.stopped_by_budget:
            raise BudgetExhausted(
                f"the run budget (max requests {state.max_requests}, max tokens {state.max_tokens}) ran out "
                f"with {len(summary.unlabelled_ids)} reports unlabelled ({progress})",
                summary,
            )
        raise LabelingFailed(
            f"{len(summary.failed_ids)} reports got no valid answer (retries used up or request rejected): "
            f"{_shown_ids(summary.failed_ids)} ({progress})",
            summary,
        )

    def _records(
        self, reports: Sequence[Report], hashes: Sequence[str], answers: Mapping[str, CachedAnswer]
    ) -> list[LabelRecord]:
        """One label record per report, in input order, carrying the teacher's provenance."""
        return [
            LabelRecord(report_id=r.report_id, labels=answers[h].labels, teacher=self.info)
            for r, h in zip(reports, hashes, strict=True)
        ]
