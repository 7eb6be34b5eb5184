"""LLM teacher: pseudo-labels reports through any OpenAI-compatible Chat Completions endpoint.

One report per request, answers forced into a JSON schema and validated with pydantic; an answer
that is not JSON or breaks the schema is asked again (bounded), never guessed. Requests run
concurrently (bounded) with retries and backoff, under an optional per-run budget, and every
validated answer is committed to a SQLite cache at once, so reruns and resumed runs only pay for
what is new.

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
import logging
import random
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import openai
from openai.types.chat import ChatCompletion
from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError, field_validator
from tqdm import tqdm

from deberta_rad.data import text_hash
from deberta_rad.net import is_loopback_host
from deberta_rad.schema import FINDINGS, STATUSES, LabelRecord, Report, Status, TeacherInfo
from deberta_rad.settings import get_settings
from deberta_rad.teachers.cache import CachedAnswer, LabelCache

log = logging.getLogger(__name__)

DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"
ALLOW_EXTERNAL_ENV = "DEBERTA_RAD_ALLOW_EXTERNAL_LLM"
NO_KEY_PLACEHOLDER = "not-needed"  # local servers ignore the key, but the SDK insists on one
RETRYABLE_STATUSES = frozenset({408, 409, 429})  # plus every 5xx
CONFIGURATION_STATUSES = frozenset({401, 403, 404})  # wrong key, model or URL: every request would fail
MAX_IDS_IN_ERROR = 20
_PROMPT_VERSION_PATTERN = re.compile(r"[A-Za-z0-9_.-]+")


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


# ----------------------------------------------------------------------------------------------
# Prompt and answer schema
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """A versioned prompt: fixed instructions first, the report last, so providers cache the prefix."""

    version: str
    system: str
    user_template: str

    def messages(self, report_text: str) -> list[dict[str, str]]:
        """Chat messages for one report (str.replace, not format: reports may contain braces)."""
        return [
            {"role": "system", "content": self.system},
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


RESPONSE_FORMAT: dict[str, Any] = {
    "type": "json_schema",
    "json_schema": {"name": "chest_xray_labels", "strict": True, "schema": answer_json_schema()},
}


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


class _RetryableFailure(Exception):
    """A failed attempt worth repeating (rate limit, server error, timeout, invalid answer)."""

    def __init__(self, reason: str, retry_after_s: float | None = None, back_off: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s
        self.back_off = back_off


class _ReportRejected(Exception):
    """The endpoint rejects this one request (e.g. a report longer than the context): do not repeat."""


def _status_failure(status: int, headers: Mapping[str, str], model: str) -> Exception:
    """Classify an HTTP error answer: retry it, give up on this report, or stop the run."""
    if status in RETRYABLE_STATUSES or status >= 500:
        return _RetryableFailure(f"HTTP {status}", retry_after_s=retry_after_seconds(headers))
    if status in CONFIGURATION_STATUSES:
        return EndpointRejected(
            f"the LLM endpoint answered HTTP {status} for model {model!r}: check OPENAI_API_KEY, "
            "OPENAI_BASE_URL (usually ending in /v1) and the model name"
        )
    return _ReportRejected(f"HTTP {status}")


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
        raise _RetryableFailure("malformed completion", back_off=False)
    choice = completion.choices[0]
    if choice.finish_reason == "length":
        raise _RetryableFailure("answer cut off at the token limit", back_off=False)
    content = choice.message.content if choice.message else None
    if not content:
        raise _RetryableFailure("empty answer or refusal", back_off=False)
    try:
        return dict(LLMAnswer.model_validate_json(content).labels)
    except ValidationError as err:
        raise _RetryableFailure(_validation_reason(err), back_off=False) from None


# ----------------------------------------------------------------------------------------------
# Run bookkeeping
# ----------------------------------------------------------------------------------------------


@dataclass
class RunSummary:
    """What one labelling run did and cost; cache hits count distinct report texts."""

    model: str
    prompt_version: str
    reports: int = 0
    unique_texts: int = 0
    cache_hits: int = 0
    requests_sent: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated_cost_usd: float | None = None
    stopped_by_budget: bool = False
    unlabelled_ids: list[str] = field(default_factory=list)
    failed_ids: list[str] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def describe(self) -> str:
        """One line for the end of a run: counts, tokens and cost."""
        cost = "unknown (no prices given)" if self.estimated_cost_usd is None else f"${self.estimated_cost_usd:.4f}"
        line = (
            f"LLM teacher {self.model} (prompt {self.prompt_version}): {self.reports} reports, "
            f"{self.unique_texts} distinct texts, {self.cache_hits} from cache, "
            f"{self.requests_sent} requests ({self.retries} retries), "
            f"tokens {self.prompt_tokens} prompt + {self.completion_tokens} completion, estimated cost {cost}"
        )
        if self.unlabelled_ids:
            line += f"; {len(self.unlabelled_ids)} reports unlabelled"
        return line + (" (stopped by budget)" if self.stopped_by_budget else "")


@dataclass
class _Job:
    """One distinct report text to label, and every report id that carries it."""

    text_hash: str
    text: str
    report_ids: list[str]

    @property
    def log_id(self) -> str:
        """Report id(s) for logs (never the text)."""
        more = len(self.report_ids) - 1
        return self.report_ids[0] + (f" (+{more} with the same text)" if more else "")


@dataclass
class _RunState:
    """Mutable state the workers share; one event loop, so no locks are needed."""

    summary: RunSummary
    max_requests: int | None
    max_tokens: int | None
    answers: dict[str, CachedAnswer]
    failed_hashes: set[str] = field(default_factory=set)
    fatal: LLMTeacherError | None = None
    resume_at: float = 0.0  # time.monotonic() before which no worker sends (server asked to wait)

    def pause_for(self, seconds: float) -> None:
        """Hold back every worker, not just the one told: Retry-After is about the client as a whole."""
        self.resume_at = max(self.resume_at, time.monotonic() + seconds)

    async def wait_if_paused(self) -> None:
        while (remaining := self.resume_at - time.monotonic()) > 0:
            await asyncio.sleep(remaining)

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

    def add_usage(self, completion: object) -> tuple[int, int]:
        """Count a response's tokens (billed even when the answer is then rejected)."""
        usage = getattr(completion, "usage", None)
        prompt = int(getattr(usage, "prompt_tokens", 0) or 0)
        completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
        self.summary.prompt_tokens += prompt
        self.summary.completion_tokens += completion_tokens
        return prompt, completion_tokens


def _group_by_text(reports: Sequence[Report], hashes: Sequence[str]) -> dict[str, _Job]:
    """One job per distinct text: identical reports (frequent "normal" reports) cost one request."""
    jobs: dict[str, _Job] = {}
    for report, digest in zip(reports, hashes, strict=True):
        if digest in jobs:
            jobs[digest].report_ids.append(report.report_id)
        else:
            jobs[digest] = _Job(digest, report.text, [report.report_id])
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
    ) -> None:
        if concurrency < 1 or max_retries < 0 or timeout_s <= 0:
            raise ValueError("need concurrency >= 1, max_retries >= 0 and timeout_s > 0")
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
        self.info = TeacherInfo(name="llm", model=self.model, prompt_version=prompt_version)
        self.last_run: RunSummary | None = None

    def label(self, reports: Sequence[Report]) -> list[LabelRecord]:
        """Label every report, in input order; raises rather than return partial labels."""
        records, _ = self.label_with_usage(reports)
        return records

    def label_with_usage(self, reports: Sequence[Report]) -> tuple[list[LabelRecord], RunSummary]:
        """Like :meth:`label`, also returning the run summary (requests, tokens, cost)."""
        return asyncio.run(self.alabel_with_usage(reports))

    async def alabel_with_usage(self, reports: Sequence[Report]) -> tuple[list[LabelRecord], RunSummary]:
        """Async core, for callers already inside an event loop.

        Raises EndpointRejected, BudgetExhausted or LabelingFailed (all carrying the summary, also
        kept in ``last_run``) when any report stays unlabelled; every answer received is cached first.
        """
        hashes = [text_hash(r.text) for r in reports]
        jobs = _group_by_text(reports, hashes)
        summary = RunSummary(self.model, self.prompt.version, reports=len(reports), unique_texts=len(jobs))
        self.last_run = summary
        with LabelCache(self.cache_dir) as cache:
            answers = cache.get_many(jobs, self.model, self.prompt.version)
            summary.cache_hits = len(answers)
            state = _RunState(summary, self.max_requests, self.max_tokens_budget, dict(answers))
            pending = [job for text_hash, job in jobs.items() if text_hash not in answers]
            if pending:
                await self._label_pending(pending, state, cache, already_done=len(reports) - self._count(pending))
        self._finish_summary(reports, hashes, state)
        log.info(summary.describe())
        self._raise_if_incomplete(state)
        return self._records(reports, hashes, state.answers), summary

    @staticmethod
    def _count(jobs: Sequence[_Job]) -> int:
        return sum(len(job.report_ids) for job in jobs)

    async def _label_pending(self, pending: list[_Job], state: _RunState, cache: LabelCache, already_done: int) -> None:
        """Run ``concurrency`` workers over the pending jobs, with a progress bar over reports."""
        log.info(
            "LLM teacher: %d distinct texts to request (%d from cache)",
            len(pending),
            state.summary.cache_hits,
        )
        api_key = self._api_key.get_secret_value() if self._api_key else NO_KEY_PLACEHOLDER
        jobs = iter(pending)  # shared by the workers: each job is taken by exactly one of them
        with tqdm(
            total=state.summary.reports, initial=already_done, unit="report", desc="LLM labels", disable=None
        ) as progress:
            async with openai.AsyncOpenAI(
                base_url=self.base_url, api_key=api_key, max_retries=0, timeout=self.timeout_s
            ) as client:
                workers = [self._worker(client, jobs, state, cache, progress) for _ in range(self.concurrency)]
                await asyncio.gather(*workers)

    async def _worker(
        self,
        client: openai.AsyncOpenAI,
        jobs: Iterator[_Job],
        state: _RunState,
        cache: LabelCache,
        progress: tqdm,
    ) -> None:
        """Take jobs one at a time until none is left or the run must stop."""
        for job in jobs:
            if not state.may_send():
                return
            try:
                answer = await self._label_job(client, job, state)
            except EndpointRejected as err:
                state.fatal = state.fatal or err
                return
            if answer is None:
                continue
            state.answers[job.text_hash] = answer
            cache.put(job.text_hash, self.model, self.prompt.version, answer)
            progress.update(len(job.report_ids))

    async def _label_job(self, client: openai.AsyncOpenAI, job: _Job, state: _RunState) -> CachedAnswer | None:
        """Ask until a valid answer arrives; None when retries, the budget or a stop end the attempts."""
        reason = "not attempted"
        for attempt in range(self.max_retries + 1):
            await state.wait_if_paused()
            if not state.may_send():
                return None
            if attempt:
                state.summary.retries += 1
            try:
                return await self._request(client, job, state)
            except _RetryableFailure as failure:
                reason, delay = failure.reason, self._retry_delay(failure, attempt)
                if failure.retry_after_s is not None:
                    state.pause_for(delay)
            except _ReportRejected as rejection:
                log.error("report %s: the endpoint rejected the request (%s); not retrying", job.log_id, rejection)
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
        log.error(
            "report %s: no valid answer after %d attempts (last: %s)",
            job.log_id,
            self.max_retries + 1,
            reason,
        )
        state.failed_hashes.add(job.text_hash)
        return None

    async def _request(self, client: openai.AsyncOpenAI, job: _Job, state: _RunState) -> CachedAnswer:
        """Send one request; return the validated answer or raise a classified failure.

        SDK exceptions are translated here and not chained (``from None``): their messages may quote
        the response body, which can echo the request, and none of it belongs in logs or errors.
        """
        state.summary.requests_sent += 1
        try:
            completion = await client.chat.completions.create(
                model=self.model,
                messages=self.prompt.messages(job.text),  # type: ignore[arg-type]
                response_format=RESPONSE_FORMAT,  # type: ignore[arg-type]
                temperature=0,
            )
        except openai.APITimeoutError:
            raise _RetryableFailure(f"no answer within {self.timeout_s:g} s") from None
        except openai.APIConnectionError:
            raise _RetryableFailure("connection failed or dropped") from None
        except openai.APIStatusError as err:
            raise _status_failure(err.status_code, err.response.headers, self.model) from None
        except (openai.APIError, ValueError):
            raise _RetryableFailure("malformed response body") from None
        prompt_tokens, completion_tokens = state.add_usage(completion)
        return CachedAnswer(_completion_labels(completion), prompt_tokens, completion_tokens)

    def _retry_delay(self, failure: _RetryableFailure, attempt: int) -> float:
        """Server's Retry-After (capped) when given, else jittered backoff; invalid answers retry at once."""
        if failure.retry_after_s is not None:
            return min(failure.retry_after_s, self.retry_after_cap_s)
        if not failure.back_off:
            return 0.0
        return backoff_delay(attempt, self.backoff_base_s, self.backoff_cap_s)

    def _finish_summary(self, reports: Sequence[Report], hashes: Sequence[str], state: _RunState) -> None:
        """Fill in cost and the ids left without labels."""
        summary = state.summary
        if self.price_per_1k_input is not None and self.price_per_1k_output is not None:
            summary.estimated_cost_usd = (
                summary.prompt_tokens * self.price_per_1k_input + summary.completion_tokens * self.price_per_1k_output
            ) / 1000
        pairs = list(zip(reports, hashes, strict=True))
        summary.unlabelled_ids = [r.report_id for r, h in pairs if h not in state.answers]
        summary.failed_ids = [r.report_id for r, h in pairs if h in state.failed_hashes]

    @staticmethod
    def _raise_if_incomplete(state: _RunState) -> None:
        """Nothing is dropped silently: any unlabelled report ends the run with a clear error."""
        summary = state.summary
        if not summary.unlabelled_ids:
            return
        labelled = summary.reports - len(summary.unlabelled_ids)
        progress = f"{labelled} of {summary.reports} reports are labelled and cached; a rerun resumes from there"
        if state.fatal is not None:
            raise type(state.fatal)(f"{state.fatal} ({progress})", summary)
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
