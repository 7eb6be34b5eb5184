"""Persistent cache of LLM teacher answers, so reruns and resumed runs pay only for what is new.

SQLite in WAL mode with one committed transaction per answer: a crash (or Ctrl-C) loses at most the
requests in flight, never a half-written row. Rows are keyed by (sha256 of the report text, model,
prompt version, structured-output mode); report text itself is never stored, because reports are PHI
and the hash suffices. The structured-output mode each endpoint took is kept beside the answers, so a
rerun probes nothing, and so are the ids of Batch API batches in flight, so an interrupted run's
batch is collected by the next run rather than paid for twice.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

CACHE_FILENAME = "llm_cache.sqlite"
_LOOKUP_CHUNK = 500  # stays below SQLite's bound-parameter limit

_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    text_sha256 TEXT NOT NULL,
    model TEXT NOT NULL,
    prompt_version TEXT NOT NULL,
    response_mode TEXT NOT NULL,
    labels_json TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (text_sha256, model, prompt_version, response_mode)
);
CREATE TABLE IF NOT EXISTS endpoints (
    base_url TEXT NOT NULL,
    model TEXT NOT NULL,
    response_mode TEXT NOT NULL,
    probed_at TEXT NOT NULL,
    PRIMARY KEY (base_url, model)
);
CREATE TABLE IF NOT EXISTS batches (
    batch_id TEXT PRIMARY KEY,
    base_url TEXT NOT NULL,
    model TEXT NOT NULL,
    prompt_version TEXT NOT NULL,
    response_mode TEXT NOT NULL,
    requests INTEGER NOT NULL,
    created_at TEXT NOT NULL
);
"""
# Caches written before the structured-output mode was part of the key hold `labels`, all asked with a
# JSON schema: their answers move to `answers` under that mode once, and the old table goes.
_MIGRATE_LABELS = """
INSERT OR IGNORE INTO answers
SELECT text_sha256, model, prompt_version, 'json_schema', labels_json, prompt_tokens, completion_tokens, created_at
FROM labels;
DROP TABLE labels;
"""


@dataclass(frozen=True)
class CachedAnswer:
    """A validated answer and the tokens it cost when it was first requested."""

    labels: dict[str, str]
    prompt_tokens: int
    completion_tokens: int


class LabelCache:
    """SQLite store of validated labels; ``cache_dir=None`` keeps it in memory for one run only."""

    def __init__(self, cache_dir: Path | str | None) -> None:
        if cache_dir is None:
            self.path: Path | None = None
            self._conn = sqlite3.connect(":memory:")
        else:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            self.path = Path(cache_dir) / CACHE_FILENAME
            self._conn = sqlite3.connect(self.path, timeout=30)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
        with self._conn:
            self._conn.executescript(_SCHEMA)
            if self._conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'labels'").fetchone():
                self._conn.executescript(_MIGRATE_LABELS)

    def get_many(
        self, hashes: Iterable[str], model: str, prompt_version: str, response_mode: str
    ) -> dict[str, CachedAnswer]:
        """Cached answers for those of ``hashes`` already labelled with this model, prompt version and
        structured-output mode."""
        wanted = list(dict.fromkeys(hashes))
        found: dict[str, CachedAnswer] = {}
        for start in range(0, len(wanted), _LOOKUP_CHUNK):
            chunk = wanted[start : start + _LOOKUP_CHUNK]
            placeholders = ",".join("?" * len(chunk))
            rows = self._conn.execute(
                "SELECT text_sha256, labels_json, prompt_tokens, completion_tokens FROM answers WHERE model = ? "
                f"AND prompt_version = ? AND response_mode = ? AND text_sha256 IN ({placeholders})",
                (model, prompt_version, response_mode, *chunk),
            )
            for text_hash, labels_json, prompt_tokens, completion_tokens in rows:
                found[text_hash] = CachedAnswer(json.loads(labels_json), prompt_tokens, completion_tokens)
        return found

    def put(self, text_hash: str, model: str, prompt_version: str, response_mode: str, answer: CachedAnswer) -> None:
        """Store one validated answer and commit at once, so it survives an interruption right after."""
        with self._conn:
            self._conn.execute(
                "INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    text_hash,
                    model,
                    prompt_version,
                    response_mode,
                    json.dumps(answer.labels, sort_keys=True),
                    answer.prompt_tokens,
                    answer.completion_tokens,
                    datetime.now(UTC).isoformat(timespec="seconds"),
                ),
            )

    def endpoint_mode(self, base_url: str, model: str) -> str | None:
        """The structured-output mode this endpoint and model took when last probed, if ever."""
        row = self._conn.execute(
            "SELECT response_mode FROM endpoints WHERE base_url = ? AND model = ?", (base_url, model)
        ).fetchone()
        return None if row is None else str(row[0])

    def put_endpoint_mode(self, base_url: str, model: str, response_mode: str | None) -> None:
        """Remember the mode an endpoint took (None forgets it, so the next run probes again)."""
        with self._conn:
            if response_mode is None:
                self._conn.execute("DELETE FROM endpoints WHERE base_url = ? AND model = ?", (base_url, model))
                return
            self._conn.execute(
                "INSERT OR REPLACE INTO endpoints VALUES (?, ?, ?, ?)",
                (base_url, model, response_mode, datetime.now(UTC).isoformat(timespec="seconds")),
            )

    def batches_in_flight(self, base_url: str, model: str, prompt_version: str, response_mode: str) -> list[str]:
        """Ids of the Batch API batches submitted for this endpoint and answer key whose answers are not in
        yet, oldest first (an interrupted run left them; the next run collects them)."""
        rows = self._conn.execute(
            "SELECT batch_id FROM batches WHERE base_url = ? AND model = ? AND prompt_version = ? "
            "AND response_mode = ? ORDER BY created_at, rowid",
            (base_url, model, prompt_version, response_mode),
        )
        return [str(row[0]) for row in rows]

    def put_batch(
        self, batch_id: str, base_url: str, model: str, prompt_version: str, response_mode: str, requests: int
    ) -> None:
        """Remember a batch the moment it exists, so an interruption never makes a rerun pay for it twice."""
        with self._conn:
            self._conn.execute(
                "INSERT OR REPLACE INTO batches VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    batch_id,
                    base_url,
                    model,
                    prompt_version,
                    response_mode,
                    requests,
                    datetime.now(UTC).isoformat(timespec="seconds"),
                ),
            )

    def forget_batch(self, batch_id: str) -> None:
        """The batch's answers are in (or it ended without any): nothing to collect any more."""
        with self._conn:
            self._conn.execute("DELETE FROM batches WHERE batch_id = ?", (batch_id,))

    def __len__(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM answers").fetchone()[0])

    def close(self) -> None:
        """Close the connection (WAL is checkpointed by SQLite when the last connection closes)."""
        self._conn.close()

    def __enter__(self) -> LabelCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
