"""What the explorer shows, as plain lookups over the storage root (DuckDB over the Parquet tables; no web, no
Dagster). A lookup reads only the tables, partitions and columns it needs: an id's first letter says its kind, a
pair or document names its shard, and each shard's tables are sorted by `doc_id` (row-group statistics let
DuckDB skip the rest of the file)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import duckdb

from fineinstructions_dagster.lib.storage import TableStore, check_partition_key
from fineinstructions_dagster.stages.controls import control_figures
from fineinstructions_dagster.stages.lineage import LineageError, trace_pair
from fineinstructions_dagster.stages.pairs import shard_controls

ID = re.compile(r"^[a-z][0-9a-f]{16}$")
# The tables an id of each kind is the key of (first letter of lib.ids.content_id's kind).
KINDS = {"p": "pair", "d": "document", "t": "template", "q": "query", "m": "match", "i": "instantiation",
         "j": "judgement"}
SHARD_TABLES = {"match": "matches", "instantiation": "instantiations", "judgement": "judgements"}


def _overlap(row: dict[str, Any]) -> str:
    """What a row removed for a benchmark overlap shares with which item ('' for other rows)."""
    if not row.get("benchmark"):
        return ""
    return f": shares “{row.get('benchmark_ngram')}” with {row['benchmark']} item {row.get('benchmark_item')}"


class Explorer:
    def __init__(self, store: TableStore):
        self.store = store
        self.con = duckdb.connect()

    # -- reading ----------------------------------------------------------------------------------------------
    def _source(self, table: str, shard: str | None = None, quarantine: bool = False) -> str | None:
        if shard is not None:
            return str(self.store.path(table, shard, quarantine)) if self.store.exists(table, shard, quarantine) \
                else None
        return self.store.glob_if_any(table, quarantine)

    def rows(self, table: str, where: str, params: Sequence[Any], columns: str = "*", shard: str | None = None,
             quarantine: bool = False, limit: int = 200, order: str = "") -> list[dict[str, Any]]:
        source = self._source(table, shard, quarantine)
        if source is None:
            return []
        rel = self.con.execute(
            f"SELECT {columns} FROM read_parquet(?, union_by_name=true) WHERE {where} {order} LIMIT {int(limit)}",
            [source, *params])
        names = [d[0] for d in rel.description]
        return [dict(zip(names, r, strict=True)) for r in rel.fetchall()]

    def one(self, table: str, column: str, value: str, shard: str | None = None,
            quarantine: bool = False) -> dict[str, Any] | None:
        found = self.rows(table, f"{column} = ?", [value], shard=shard, quarantine=quarantine, limit=1)
        return found[0] if found else None

    # -- search -----------------------------------------------------------------------------------------------
    def search(self, q: str) -> list[dict[str, str]]:
        """Every object `q` names: an id of any kind, a document's url or source id, a query's source id.
        Each hit: {"kind", "id", "label", "shard"}; the caller opens the page of a single hit."""
        q = q.strip()
        if not q:
            return []
        hits: list[dict[str, str]] = []
        if ID.match(q) and q[0] in KINDS:
            kind = KINDS[q[0]]
            if kind == "pair":
                row = self.one("fineinstructions", "pair_id", q)
                if row:
                    hits.append({"kind": "pair", "id": q, "label": row["instruction"], "shard": row["shard"]})
            elif kind == "document":
                row = self._document_row(q)
                if row:
                    hits.append({"kind": "document", "id": q, "label": row.get("url") or "", "shard": row["shard"]})
            elif kind == "template":
                row = self.one("template_bank", "template_id", q)
                if row:
                    hits.append({"kind": "template", "id": q, "label": row["template"], "shard": ""})
            elif kind == "query":
                row = self.one("user_queries", "query_id", q)
                if row:
                    hits.append({"kind": "query", "id": q, "label": row["text"], "shard": ""})
            else:  # a step's row: its pair if it made one, else its document
                column = f"{kind}_id"
                pair = self.one("fineinstructions", column, q)
                if pair:
                    hits.append({"kind": "pair", "id": pair["pair_id"], "label": pair["instruction"],
                                 "shard": pair["shard"]})
                else:
                    row = (self.one(SHARD_TABLES[kind], column, q)
                           or self.one(SHARD_TABLES[kind], column, q, quarantine=True))
                    if row:
                        hits.append({"kind": "document", "id": row["doc_id"], "label": f"{kind} {q}",
                                     "shard": row.get("shard") or ""})
            return hits
        for row in self.rows("documents", "url = ? OR source_id = ?", [q, q], "doc_id, url, shard", limit=50):
            hits.append({"kind": "document", "id": row["doc_id"], "label": row["url"] or "", "shard": row["shard"]})
        for row in self.rows("filtered_documents", "url = ? OR source_id = ?", [q, q], "doc_id, url, shard",
                             quarantine=True, limit=50):
            hits.append({"kind": "document", "id": row["doc_id"], "label": row["url"] or "", "shard": row["shard"]})
        for row in self.rows("user_queries", "source_id = ?", [q], "query_id, text", limit=50):
            hits.append({"kind": "query", "id": row["query_id"], "label": row["text"], "shard": ""})
        return hits

    # -- pages ------------------------------------------------------------------------------------------------
    def pair(self, pair_id: str) -> dict[str, Any]:
        """The whole chain (stages.lineage.trace_pair) plus what the page highlights."""
        chain = trace_pair(self.store, pair_id)
        chain["template_parts"] = split_slots(chain["template"]["template"])
        chain["document_parts"] = highlight_quotes(chain["document"]["text"], chain["pair"]["answer"])
        return chain

    def _document_row(self, doc_id: str, shard: str | None = None) -> dict[str, Any] | None:
        for table, quarantine in (("documents", False), ("documents", True), ("filtered_documents", True),
                                  ("filtered_documents", False)):
            row = self.one(table, "doc_id", doc_id, shard=shard, quarantine=quarantine)
            if row:
                return row
        return None

    def document(self, doc_id: str) -> dict[str, Any]:
        """The document, its pairs, and where there are none, why: which filter rule, duplicate of what, no
        match above the score, which gate dropped each instantiation or judgement."""
        row = self._document_row(doc_id)
        if row is None:
            raise LineageError(f"document {doc_id!r} is in no documents table under {self.store.root}")
        shard = row["shard"]
        pairs = self.rows("fineinstructions", "doc_id = ?", [doc_id],
                          "pair_id, instruction, judge_score, grounding, template_id", shard=shard,
                          order="ORDER BY pair_id")
        why: list[str] = []
        if not pairs:
            why = self._why_no_pairs(doc_id, shard)
        return {"document": row, "shard": shard, "pairs": pairs, "why": why}

    def _why_no_pairs(self, doc_id: str, shard: str) -> list[str]:
        filtered = self.one("filtered_documents", "doc_id", doc_id, shard=shard, quarantine=True)
        if filtered:
            return [f"filtered out by the rule `{filtered['reason']}`" + (f": {filtered['detail']}"
                                                                        if filtered.get("detail") else "")
                    + _overlap(filtered)]
        removed = self.one("documents", "doc_id", doc_id, shard=shard, quarantine=True)
        if removed:
            return [f"removed as `{removed['reason']}` of document {removed.get('duplicate_of')} (shard "
                    f"{removed.get('duplicate_of_shard')}, similarity {removed.get('similarity')})"]
        out: list[str] = []
        unmatched = self.one("matches", "doc_id", doc_id, shard=shard, quarantine=True)
        if unmatched:
            out.append(f"no template matched: `{unmatched['reason']}`")
        matches = self.rows("matches", "doc_id = ?", [doc_id], "match_id", shard=shard)
        if not matches and not unmatched:
            out.append("no match was made for it (the shard's matching has not run since it was added?)")
        for r in self.rows("instantiations", "doc_id = ?", [doc_id], "match_id, reason, detail", shard=shard,
                           quarantine=True):
            out.append(f"instantiation of match {r['match_id']} dropped: `{r['reason']}`")
        for r in self.rows("judgements", "doc_id = ?", [doc_id], "instantiation_id, reason", shard=shard,
                           quarantine=True):
            out.append(f"judgement of instantiation {r['instantiation_id']} dropped: `{r['reason']}`")
        judged = {r["judgement_id"] for r in self.rows("judgements", "doc_id = ?", [doc_id], "judgement_id",
                                                        shard=shard)}
        if judged:
            marks = ", ".join("?" for _ in judged)
            for r in self.rows("fineinstructions", f"judgement_id IN ({marks})", sorted(judged), "*", shard=shard,
                               quarantine=True):
                grounding = "-" if r.get("grounding") is None else f"{r['grounding']:.2f}"
                out.append(f"pair of judgement {r['judgement_id']} not selected: `{r['reason']}` (judge score "
                           f"{r['judge_score']}, grounding {grounding})" + _overlap(r))
        return out or ["no reason recorded (the shard's later steps have not run yet?)"]

    def template(self, template_id: str) -> dict[str, Any]:
        row = self.one("template_bank", "template_id", template_id)
        if row is None:
            raise LineageError(f"template {template_id!r} is not in the template bank under {self.store.root}")
        ids = list(row["query_ids"] or [])
        marks = ", ".join("?" for _ in ids) or "NULL"
        queries = self.rows("user_queries", f"query_id IN ({marks})", ids, "query_id, source, text")
        pairs = self.rows("fineinstructions", "template_id = ?", [template_id],
                          "pair_id, shard, instruction, judge_score", order="ORDER BY pair_id")
        return {"template": row, "parts": split_slots(row["template"]), "queries": queries, "pairs": pairs}

    def query(self, query_id: str) -> dict[str, Any]:
        row = self.one("user_queries", "query_id", query_id)
        if row is None:
            raise LineageError(f"query {query_id!r} is in no user_queries table under {self.store.root}")
        templates = self.rows("template_bank", "list_contains(query_ids, ?)", [query_id], "template_id, template")
        return {"query": row, "templates": templates}

    def shards(self) -> list[str]:
        return self.store.partitions("fineinstructions")

    def shard(self, shard: str) -> dict[str, Any]:
        try:  # a key that is no file name (`../../etc`) names no shard: never a path to read
            check_partition_key(shard)
        except ValueError as e:
            raise LineageError(f"no shard is named {shard!r}: {e}") from e
        source = self._source("fineinstructions", shard)
        if source is None:
            raise LineageError(f"shard {shard!r} has no fineinstructions table under {self.store.root}")
        con = self.con

        def grouped(sql: str) -> list[tuple[Any, int]]:
            return [(k, int(n)) for k, n in con.execute(sql, [source]).fetchall()]

        scores = grouped("SELECT judge_score, count(*) FROM read_parquet(?) GROUP BY 1 ORDER BY 1")
        grounding = grouped("SELECT least(floor(grounding * 10), 9) / 10, count(*) FROM read_parquet(?) "
                            "GROUP BY 1 ORDER BY 1")
        usage = grouped("SELECT template_id, count(*) AS n FROM read_parquet(?) GROUP BY 1 ORDER BY n DESC, 1 "
                        "LIMIT 20")
        n = sum(c for _, c in scores)
        sample = self.rows("fineinstructions", "true", [], "pair_id, instruction, judge_score, grounding",
                           shard=shard, limit=50, order="ORDER BY pair_id")
        return {"shard": shard, "pairs": n, "sample": sample, "controls": self.controls(shard),
                "histograms": {"judge score": [(str(k), c) for k, c in scores],
                               "grounding": [(f"{float(k):.1f}", c) for k, c in grounding],
                               "template usage (top 20)": [(str(k), c) for k, c in usage]}}


    def controls(self, shard: str) -> dict[str, Any] | None:
        """The shard's control pairs: what the gates kept of them, each signal's AUC of real pair over control, and
        the controls that got through first (the ones that say what the gates miss)."""
        if not self.store.exists("control_outcomes", shard):
            return None
        true, outcomes = shard_controls(self.store, shard)
        shown = outcomes.sort(["kept", "control_id"], descending=[True, False]).head(20).to_dicts()
        ids = [r["control_id"] for r in shown]
        judged = self.rows("control_judgements", "list_contains(?, control_id)", [ids],
                           "control_id, instruction, answer", shard=shard) if ids else []
        text = {r["control_id"]: r for r in judged}
        return {"figures": control_figures(true, outcomes),
                "sample": [{**r, "instruction": text.get(r["control_id"], {}).get("instruction", ""),
                            "answer": text.get(r["control_id"], {}).get("answer", "")} for r in shown]}


_SLOT = re.compile(r"(<fi>.*?</fi>)", re.DOTALL)


def split_slots(template: str) -> list[tuple[str, bool]]:
    """The template as (text, is_slot) pieces, slot text without its tags."""
    return [(p[4:-5], True) if p.startswith("<fi>") else (p, False) for p in _SLOT.split(template) if p]


_WORDS = re.compile(r"\w+")


def highlight_quotes(document: str, answer: str, span: int = 3) -> list[tuple[str, bool]]:
    """The document as (text, quoted) pieces: quoted where a run of >= `span` words of the answer occurs (the
    same rule grounding counts by)."""
    answer_grams = {tuple(w.lower() for w in g) for g in _ngrams(_WORDS.findall(answer), span)}
    words = list(_WORDS.finditer(document))
    quoted = [False] * len(words)
    for i in range(len(words) - span + 1):
        if tuple(w.group().lower() for w in words[i:i + span]) in answer_grams:
            quoted[i:i + span] = [True] * span
    pieces: list[tuple[str, bool]] = []
    pos = 0
    i = 0
    while i < len(words):
        if not quoted[i]:
            i += 1
            continue
        j = i
        while j + 1 < len(words) and quoted[j + 1]:
            j += 1
        start, end = words[i].start(), words[j].end()
        if start > pos:
            pieces.append((document[pos:start], False))
        pieces.append((document[start:end], True))
        pos, i = end, j + 1
    if pos < len(document):
        pieces.append((document[pos:], False))
    return pieces


def _ngrams(words: list[str], n: int) -> list[list[str]]:
    return [words[i:i + n] for i in range(len(words) - n + 1)]

