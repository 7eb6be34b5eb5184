"""The LLM teacher through the OpenAI Batch API: the same requests at half the price, answered within 24 h.

With ``LLMTeacher(batch=True)`` (``deberta-rad label --batch``, params ``pseudo_label.batch``) this
replaces the concurrent workers:

1. batches an interrupted run left in flight (their ids are kept in the answer cache) are collected first;
2. the reports still without an answer go up as a Batch input file (JSONL, one Chat Completions request
   per distinct text, ``custom_id`` = the text's hash), built in memory: the report text goes to the
   endpoint as in any run, but is never written to disk here;
3. the batch is polled every ``batch_poll_s`` with a progress bar over its requests;
4. its answers are validated like any other and go into the same answer cache. Answers that are invalid,
   failed with a retryable status, or whose No Finding contradicts the findings (asked again with the
   contradiction named) go into a follow-up batch, up to the teacher's retries. The batch's files are
   then deleted from the endpoint, since they hold reports.

An endpoint without the Batch API (the local servers) answers the file upload with 404, 405 or 501: that
is told apart from a failure and named, with the setting that turns batching off.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import openai
from openai.types import Batch
from openai.types.chat import ChatCompletion
from pydantic import ValidationError
from tqdm import tqdm

from deberta_rad.parallel import chunked
from deberta_rad.teachers.cache import LabelCache
from deberta_rad.teachers.llm import (
    EndpointRejected,
    LabelJob,
    LLMTeacherError,
    ReportRejected,
    RetryableFailure,
    RunState,
    server_message,
    status_failure,
)

if TYPE_CHECKING:
    from deberta_rad.teachers.llm import LLMTeacher

log = logging.getLogger(__name__)

BATCH_ENDPOINT = "/v1/chat/completions"
COMPLETION_WINDOW = "24h"  # the only window the Batch API offers
MAX_BATCH_REQUESTS = 50_000  # OpenAI's limit per batch; larger runs go up as several batches
UPLOAD_TIMEOUT_S = 600.0  # an input file of tens of thousands of reports takes longer than one request
UNSUPPORTED_STATUSES = frozenset({404, 405, 501})
ENDED_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})
BATCH_OFF = "label without --batch (params.yaml pseudo_label.batch: false)"


class BatchUnsupported(LLMTeacherError):
    """The endpoint has no Batch API (local servers): a setting to change, not a failure to retry."""


class BatchFailed(LLMTeacherError):
    """The endpoint refused a whole batch (its input did not validate) or lost it."""


async def label_by_batch(
    teacher: LLMTeacher, client: openai.AsyncOpenAI, cache: LabelCache, pending: Sequence[LabelJob], state: RunState
) -> None:
    """Label the pending jobs by batch (see the module docstring); what stops the run is left in
    ``state.fatal``, as the concurrent workers do."""
    jobs = {job.text_hash: job for job in pending}
    key = (teacher.base_url, teacher.model, teacher.prompt.version, state.summary.response_mode)
    for batch_id in cache.batches_in_flight(*key):
        tqdm.write(f"LLM teacher: collecting batch {batch_id}, left in flight by an earlier run", file=sys.stderr)
        await _collect(teacher, client, cache, batch_id, jobs, state)
    while state.may_send() and (unanswered := _unanswered(jobs.values(), state, teacher.max_retries)):
        for chunk in chunked(_within_budget(unanswered, state), MAX_BATCH_REQUESTS):
            batch_id = await _submit(teacher, client, cache, chunk, state)
            if batch_id is None:
                return
            await _collect(teacher, client, cache, batch_id, jobs, state, submitted=chunk)
            if state.fatal is not None:
                return
    _give_up_on(jobs.values(), state, teacher.max_retries)


def _unanswered(jobs: Iterable[LabelJob], state: RunState, max_retries: int) -> list[LabelJob]:
    """Jobs with no answer yet that may still be asked."""
    return [
        job
        for job in jobs
        if job.text_hash not in state.answers
        and job.text_hash not in state.failed_hashes
        and job.attempts <= max_retries
    ]


def _within_budget(jobs: list[LabelJob], state: RunState) -> list[LabelJob]:
    """As many jobs as the request budget leaves room for (every line of a batch is a request)."""
    if state.max_requests is None:
        return jobs
    room = state.max_requests - state.summary.requests_sent
    if room < len(jobs):
        state.summary.stopped_by_budget = True
    return jobs[:room]


def _give_up_on(jobs: Iterable[LabelJob], state: RunState, max_retries: int) -> None:
    """Jobs whose attempts are used up count as failed, as in the concurrent path."""
    exhausted = [job for job in jobs if job.text_hash not in state.answers and job.attempts > max_retries]
    for job in exhausted:
        state.failed_hashes.add(job.text_hash)
    if exhausted:
        log.error("%d reports got no valid answer in %d batch attempts each", len(exhausted), max_retries + 1)


async def _submit(
    teacher: LLMTeacher, client: openai.AsyncOpenAI, cache: LabelCache, jobs: Sequence[LabelJob], state: RunState
) -> str | None:
    """Upload the jobs' requests as a Batch input file and create the batch; its id goes into the cache
    at once. None when the endpoint refused (``state.fatal`` says why)."""
    mode = state.summary.response_mode
    lines = [
        json.dumps(
            {
                "custom_id": job.text_hash,
                "method": "POST",
                "url": BATCH_ENDPOINT,
                "body": teacher.request_body(job, mode),
            }
        )
        for job in jobs
    ]
    step = "POST /files"
    try:
        uploaded = await client.files.create(
            file=("deberta-rad-batch.jsonl", ("\n".join(lines) + "\n").encode()),
            purpose="batch",
            timeout=max(teacher.timeout_s, UPLOAD_TIMEOUT_S),
        )
        step = "POST /batches"
        batch = await client.batches.create(
            input_file_id=uploaded.id,
            endpoint=BATCH_ENDPOINT,
            completion_window=COMPLETION_WINDOW,
            metadata={"created_by": "deberta-rad", "prompt_version": teacher.prompt.version},
        )
    except openai.APIStatusError as err:
        state.fatal = _refusal(teacher, step, err)
        return None
    except (openai.APITimeoutError, openai.APIConnectionError):
        state.fatal = LLMTeacherError(f"{step} to {teacher.base_url} got no answer: is the server running there?")
        return None
    cache.put_batch(batch.id, teacher.base_url, teacher.model, teacher.prompt.version, mode, len(jobs))
    state.summary.requests_sent += len(jobs)
    state.summary.retries += sum(1 for job in jobs if job.attempts)
    tqdm.write(
        f"LLM teacher: batch {batch.id} holds {len(jobs)} requests; polling every {teacher.batch_poll_s:g} s. "
        "Interrupting is safe: the next run collects this batch instead of sending it again",
        file=sys.stderr,
    )
    return batch.id


def _refusal(teacher: LLMTeacher, step: str, err: openai.APIStatusError) -> LLMTeacherError:
    """What a refused upload or batch creation means: no Batch API, a wrong key or model, or a failure."""
    message = server_message(err.body, "", teacher.secret())
    answered = f"{step} answered HTTP {err.status_code}" + (f" ({message})" if message else "")
    if err.status_code in UNSUPPORTED_STATUSES:
        return BatchUnsupported(
            f"the LLM endpoint {teacher.base_url} has no Batch API ({answered}): {BATCH_OFF}. "
            "OpenAI and Azure OpenAI offer it, local servers mostly do not"
        )
    failure = status_failure(err.status_code, err.body, teacher.model, "", teacher.secret())
    if isinstance(failure, EndpointRejected):
        return failure
    return BatchFailed(f"the LLM endpoint {teacher.base_url} refused the batch: {answered}")


async def _collect(
    teacher: LLMTeacher,
    client: openai.AsyncOpenAI,
    cache: LabelCache,
    batch_id: str,
    jobs: dict[str, LabelJob],
    state: RunState,
    submitted: Sequence[LabelJob] = (),
) -> None:
    """Wait for a batch to end, take its answers into the cache, then forget it and delete its files."""
    batch = await _wait_until_ended(teacher, client, batch_id)
    if batch is None:  # the endpoint no longer knows it: its requests are asked again
        cache.forget_batch(batch_id)
        return
    if batch.status == "failed":
        cache.forget_batch(batch_id)
        state.fatal = BatchFailed(f"batch {batch_id} failed: {_batch_errors(batch, teacher)}")
        return
    try:
        lines = [*await _lines(client, batch.output_file_id), *await _lines(client, batch.error_file_id)]
    except (openai.APIError, ValueError) as err:
        raise LLMTeacherError(
            f"could not download the answers of batch {batch_id} ({type(err).__name__}); it stays recorded in "
            "the cache, and a rerun collects it",
            state.summary,
        ) from None
    failed: dict[str, Exception] = {}
    for line in lines:
        job = jobs.get(str(line.get("custom_id")))
        if job is None or job.text_hash in failed or job.text_hash in state.answers:
            continue  # a text this run does not label (an earlier run asked it), or a line seen already
        if (failure := _take_line(teacher, cache, line, job, state)) is not None:
            failed[job.text_hash] = failure
    for job in submitted:  # a request the batch did not answer at all counts as a failed attempt
        if job.text_hash not in failed and job.text_hash not in state.answers:
            job.attempts += 1
            failed[job.text_hash] = RetryableFailure("no answer in the batch", systematic=False)
    reasons = Counter(_note(jobs[digest], state, failure) for digest, failure in failed.items())
    cache.forget_batch(batch_id)
    state.summary.batch_ids.append(batch_id)
    if reasons:
        shown = "; ".join(f"{reason}: {count}" for reason, count in reasons.most_common(3))
        log.warning(
            "batch %s (%s): %d answers to ask again or give up on (%s)", batch_id, batch.status, reasons.total(), shown
        )
    await _delete_files(client, batch)


async def _wait_until_ended(teacher: LLMTeacher, client: openai.AsyncOpenAI, batch_id: str) -> Batch | None:
    """Poll the batch until it has ended, with a progress bar over its requests; None when the endpoint
    no longer knows the batch. Transient errors while polling are waited out, not fatal."""
    with tqdm(unit="request", desc=f"LLM batch {batch_id}", disable=None) as progress:
        while True:
            try:
                batch = await client.batches.retrieve(batch_id)
            except openai.NotFoundError:
                log.warning(
                    "batch %s is unknown to %s (expired or deleted): asking its reports again",
                    batch_id,
                    teacher.base_url,
                )
                return None
            except (
                openai.APIConnectionError,
                openai.APITimeoutError,
                openai.InternalServerError,
                openai.RateLimitError,
            ):
                log.warning("batch %s: polling failed; trying again in %g s", batch_id, teacher.batch_poll_s)
            else:
                counts = batch.request_counts
                if counts is not None and counts.total:
                    progress.total = counts.total
                    progress.n = counts.completed + counts.failed
                    progress.refresh()
                if batch.status in ENDED_STATUSES:
                    return batch
            await asyncio.sleep(teacher.batch_poll_s)


def _batch_errors(batch: Batch, teacher: LLMTeacher) -> str:
    """The endpoint's reasons for failing a whole batch (they describe the input file, not reports)."""
    errors = batch.errors.data if batch.errors and batch.errors.data else []
    messages = [server_message({"message": e.message}, "", teacher.secret()) or str(e.code) for e in errors[:3]]
    return "; ".join(m for m in messages if m) or "no reason given"


async def _lines(client: openai.AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    """The JSON lines of a batch's output or error file (none when the batch has no such file)."""
    if not file_id:
        return []
    content = await client.files.content(file_id)
    return [json.loads(line) for line in content.text.splitlines() if line.strip()]


def _take_line(
    teacher: LLMTeacher, cache: LabelCache, line: dict[str, Any], job: LabelJob, state: RunState
) -> Exception | None:
    """Validate one line of a batch's output and cache its answer; otherwise why it failed (the job goes
    into the next batch while it has attempts left)."""
    job.attempts += 1
    response = line.get("response") or {}
    status = response.get("status_code")
    if status is None:  # the batch did not send it: expired, cancelled, or refused by the endpoint
        error = line.get("error") or {}
        return RetryableFailure(str(error.get("code") or "no response"), systematic=False)
    if status != 200:
        return status_failure(status, response.get("body"), teacher.model, job.text, teacher.secret())
    try:
        completion = ChatCompletion.model_validate(response.get("body"))
        answer = teacher.answer(completion, job, state, job.attempts <= teacher.max_retries, batch=True)
    except ValidationError:
        return RetryableFailure("malformed completion")
    except RetryableFailure as failure:
        return failure
    state.answers[job.text_hash] = answer
    state.labelled += 1
    cache.put(job.text_hash, teacher.model, teacher.prompt.version, state.summary.response_mode, answer)
    return None


def _note(job: LabelJob, state: RunState, failure: Exception) -> str:
    """Record a failed line as the concurrent path does, once the whole batch is read (so that the run's
    first answers are all in before deciding it fails systematically): a rejected report is given up on,
    a refused key or model stops the run, and so does the same failure on every first report."""
    if isinstance(failure, EndpointRejected):
        state.fatal = state.fatal or failure
        return "endpoint rejected the key or model"
    reason, hint = getattr(failure, "reason", str(failure)), getattr(failure, "hint", "")
    if isinstance(failure, ReportRejected):
        state.failed_hashes.add(job.text_hash)
    if getattr(failure, "systematic", True):
        state.note_failure(job.text_hash, reason, hint)
    return reason


async def _delete_files(client: openai.AsyncOpenAI, batch: Batch) -> None:
    """Delete the batch's files from the endpoint once their answers are cached: they hold reports."""
    for file_id in (batch.input_file_id, batch.output_file_id, batch.error_file_id):
        if not file_id:
            continue
        try:
            await client.files.delete(file_id)
        except openai.APIError:
            log.warning("could not delete file %s of batch %s from the endpoint; delete it there", file_id, batch.id)
