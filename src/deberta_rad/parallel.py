"""An order-keeping map over chunks on every core, for the stages that stream a corpus.

Results come back in input order, so any number of workers writes the same bytes as one; and only a few
chunks per worker are in flight at a time, so memory does not grow with the input (`Pool.imap` would read
the whole input ahead of slow workers).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from itertools import chain, islice
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

CHUNK_SIZE = 1000
CHUNKS_IN_FLIGHT_PER_WORKER = 2


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and `taskset` narrow), or
    the machine's cores where the system has no affinity call (macOS)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def resolve_workers(workers: int | None) -> int:
    """`None` or 0 means every available core; a negative count is a mistake."""
    if workers is not None and workers < 0:
        raise ValueError(f"workers must be 0 (all cores) or more, not {workers}")
    return workers or available_cores()


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of `size` items (the last one shorter)."""
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def ordered_map(
    function: Callable[[list[T]], list[R]], items: Iterable[T], workers: int = 1, chunk_size: int | None = None
) -> Iterator[R]:
    """`function` over chunks of `items`, flattened, in input order. One worker (or an input of one chunk)
    runs in this process; more run in a pool of fresh processes (forkserver: safe when this process holds
    threads or torch), no more than the first window of chunks needs, so `function` must be importable
    and its chunks picklable. An exception in a chunk is raised here when its turn comes, after the
    results of every chunk before it."""
    chunks = chunked(items, chunk_size or CHUNK_SIZE)
    window = list(islice(chunks, max(workers, 1) * CHUNKS_IN_FLIGHT_PER_WORKER))
    processes = min(workers, len(window))
    if processes <= 1:  # a single chunk is not worth starting processes for
        for chunk in chain(window, chunks):
            yield from function(chunk)
        return
    with multiprocessing.get_context("forkserver").Pool(processes, initializer=ignore_interrupts) as pool:
        pending: deque = deque()
        for chunk in chain(window, chunks):
            pending.append(pool.apply_async(function, (chunk,)))
            if len(pending) >= processes * CHUNKS_IN_FLIGHT_PER_WORKER:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


def ignore_interrupts() -> None:
    """A worker's start: Ctrl-C is the parent's to handle (it stops the pool), so each worker does not
    print a KeyboardInterrupt traceback of its own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
