"""Per-pair lineage: from a final pair back through its judgement, instantiation, match, template,
source query and document, with the Dagster run that produced each step. DuckDB over the Parquet."""

from __future__ import annotations

import json
import re
from typing import Any

import duckdb

from fineinstructions_dagster.lib.storage import TableStore

LINEAGE_KEYS = ("pair", "judgement", "instantiation", "match", "template", "query", "document", "runs")


class LineageError(LookupError):
    """A pair that is not found, or whose chain does not resolve."""


def _one(con: duckdb.DuckDBPyConnection, store: TableStore, table: str, column: str, value: str,
         partition: str | None = None) -> dict[str, Any] | None:
    if partition:
        source = str(store.path(table, partition)) if store.exists(table, partition) else None
    else:
        source = store.glob_if_any(table)
    if source is None:
        return None
    rel = con.execute(f"SELECT * FROM read_parquet(?, union_by_name=true) WHERE {column} = ? LIMIT 1",
                      [source, value])
    row = rel.fetchone()
    if row is None:
        return None
    return dict(zip([d[0] for d in rel.description], row, strict=True))


def trace_pair(store: TableStore, pair_id: str) -> dict[str, Any]:
    """The whole chain for one pair; raises LineageError naming the first link that does not resolve."""
    con = duckdb.connect()
    pair = _one(con, store, "fineinstructions", "pair_id", pair_id)
    if pair is None:
        raise LineageError(f"pair {pair_id!r} not found under {store.root / 'fineinstructions'}")
    shard = pair["shard"]
    chain: dict[str, Any] = {"pair": pair}
    links = [
        ("judgement", "judgements", "judgement_id", pair["judgement_id"], shard),
        ("instantiation", "instantiations", "instantiation_id", pair["instantiation_id"], shard),
        ("match", "matches", "match_id", pair["match_id"], shard),
        ("template", "template_bank", "template_id", pair["template_id"], "all"),
        ("query", "user_queries", "query_id", pair["query_id"], None),
        ("document", "documents", "doc_id", pair["doc_id"], shard),
    ]
    for key, table, column, value, partition in links:
        row = _one(con, store, table, column, value, partition)
        if row is None:
            raise LineageError(f"pair {pair_id}: {key} {column}={value!r} not found in table {table!r}")
        chain[key] = row
    # The genericizer's record for this query -> template (prompt, raw output, model).
    gen = con.execute(
        "SELECT * FROM read_parquet(?, union_by_name=true) WHERE query_id = ? AND template_id = ? LIMIT 1",
        [store.glob("templates"), pair["query_id"], pair["template_id"]],
    )
    row = gen.fetchone()
    if row is None:
        raise LineageError(f"pair {pair_id}: no genericizer record for query {pair['query_id']}")
    chain["template"]["genericization"] = dict(zip([d[0] for d in gen.description], row, strict=True))
    # The runs recorded on the pair when it was selected (a step run again since, e.g. the template bank after
    # a new query source, must not be reported as the one that made this pair); the rows' own for the rest.
    def recorded(step: str, row_run: str) -> str:
        return pair.get(f"{step}_run_id") or row_run

    chain["runs"] = {
        "user_queries": chain["query"]["run_id"],
        "templates": chain["template"]["genericization"]["run_id"],
        "template_bank": recorded("template_bank", chain["template"]["run_id"]),
        "documents": recorded("documents", chain["document"]["run_id"]),
        "matches": recorded("matches", chain["match"]["run_id"]),
        "instantiations": recorded("instantiations", chain["instantiation"]["run_id"]),
        "judgements": recorded("judgements", chain["judgement"]["run_id"]),
        "fineinstructions": pair["run_id"],
    }
    return json.loads(json.dumps(chain, default=str))  # plain JSON types (lists, no numpy)


def _short(text: Any, n: int = 400) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= n else s[:n] + " ..."


def _score(value: Any) -> str:
    return "-" if value is None else f"{float(value):.2f}"


def format_lineage(chain: dict[str, Any]) -> str:
    p, j, i, m, t, q, d = (chain[k] for k in LINEAGE_KEYS[:7])
    g = t["genericization"]
    lines = [
        f"PAIR {p['pair_id']}  (shard {p['shard']}, judge score {p['judge_score']}, "
        f"grounding {p['grounding']:.2f}, relevance {_score(p.get('relevance'))} by {p.get('relevance_model') or '-'} "
        f"(margin {_score(p.get('relevance_margin'))} over its baseline {_score(p.get('relevance_baseline'))}), "
        f"fills in document {_score(p.get('fill_in_document'))} / in answer {_score(p.get('fill_in_answer'))})",
        f"  instruction: {_short(p['instruction'])}",
        f"  answer:      {_short(p['answer'])}",
        f"JUDGEMENT {j['judgement_id']}  score={j['score']}  model={j['model']}@{j['model_revision']} "
        f"prompt={j['prompt_version']}",
        f"  feedback: {_short(j['feedback'], 200)}",
        f"INSTANTIATION {i['instantiation_id']}  model={i['model']}@{i['model_revision']} "
        f"backend={i['backend']} prompt={i['prompt_version']}",
        f"  sampling: {i['sampling_params']}",
        f"  prompt:     {_short(i['prompt'], 300)}",
        f"  raw output: {_short(i['raw_output'], 300)}",
        f"MATCH {m['match_id']}  score={m['score']:.3f} rank={m['rank']} chunk={m['chunk']}"
        + (f" (centred {m['chunk_position']:.0%} into the document)" if m.get("chunk_position") is not None else "")
        + f" index={m['index_id']}",
        f"  matcher: {m.get('pooling', '')}",
        f"TEMPLATE {t['template_id']}  ({t['n_queries']} source queries)",
        f"  template:    {_short(t['template'])}",
        f"  compatible document: {_short(t['compatible_document_description'])}",
        f"  genericizer: model={g['model']}@{g['model_revision']} prompt={g['prompt_version']}",
        f"  raw output:  {_short(g['raw_output'], 300)}",
        f"QUERY {q['query_id']}  source={q['source']} file={q['source_file']} row={q['source_row']}",
        f"  text: {_short(q['text'])}",
        f"DOCUMENT {d['doc_id']}  shard={d['shard']} file={d['source_file']} row={d['source_row']}",
        f"  url:  {d['url']}",
        f"  text: {_short(d['text'], 500)}",
        "RUNS (Dagster run ids)",
        *[f"  {k:<17} {v}" for k, v in chain["runs"].items()],
    ]
    return "\n".join(lines)


def trace_document(store: TableStore, key: str) -> dict[str, Any]:
    """Where a document went, by doc_id, source id or url: kept, dropped by a filter (with the reason),
    or removed as a duplicate (with the doc_id it duplicates and the estimated similarity)."""
    con = duckdb.connect()
    where = "doc_id = ? OR source_id = ? OR url = ?"
    places = [("documents", False, "kept"), ("documents", True, "removed as duplicate"),
              ("filtered_documents", True, "dropped by a filter")]
    for table, quarantine, status in places:
        source = store.glob_if_any(table, quarantine)
        if source is None:
            continue
        rel = con.execute(f"SELECT * FROM read_parquet(?, union_by_name=true) WHERE {where} LIMIT 1",
                          [source, key, key, key])
        row = rel.fetchone()
        if row is not None:
            found = dict(zip([d[0] for d in rel.description], row, strict=True))
            found.pop("text", None)
            return json.loads(json.dumps({"status": status, **found}, default=str))
    raise LineageError(f"no document with doc_id, source id or url {key!r} under {store.root}")


# (step, chain key, id column, asset key, partitioned by shard)
_STEPS = [
    ("pair", "pair", "pair_id", "fineinstructions", True),
    ("judgement", "judgement", "judgement_id", "judgements", True),
    ("instantiation", "instantiation", "instantiation_id", "instantiations", True),
    ("match", "match", "match_id", "matches", True),
    ("template", "template", "template_id", "template_bank", False),
    ("query", "query", "query_id", "user_queries", False),
    ("document", "document", "doc_id", "documents", True),
]


_MD_SPECIAL = re.compile(r"([\\`*_\[\]|])")


def _md_cell(text: Any, n: int = 300) -> str:
    # Model text is shown as text: markdown's own characters are escaped (so a stray backtick cannot open a code
    # span) and angle brackets become entities (templates hold <fi>...</fi> slots, which would read as HTML).
    return _MD_SPECIAL.sub(r"\\\1", _short(text, n)).replace("<", "&lt;").replace(">", "&gt;")


def lineage_markdown(chain: dict[str, Any]) -> str:
    """The chain as a markdown table for the Dagster UI: each step's id, what defines it, and links to the
    run that produced it and to the asset partition it lives in (paths of the Dagster web UI)."""
    p, t, q = chain["pair"], chain["template"], chain["query"]
    shard = p["shard"]
    run_of = {"pair": chain["runs"]["fineinstructions"], "judgement": chain["runs"]["judgements"],
              "instantiation": chain["runs"]["instantiations"], "match": chain["runs"]["matches"],
              "template": chain["runs"]["template_bank"], "query": chain["runs"]["user_queries"],
              "document": chain["runs"]["documents"]}
    partition_of = {"query": q["source"]}
    detail = {
        "pair": f"judge {p['judge_score']}, grounding {p['grounding']:.2f}, relevance {_score(p.get('relevance'))} "
                f"(margin {_score(p.get('relevance_margin'))})",
        "judgement": f"score {chain['judgement']['score']} by {chain['judgement']['model']} "
                     f"({chain['judgement']['prompt_version']})",
        "instantiation": f"{chain['instantiation']['model']} ({chain['instantiation']['prompt_version']})",
        "match": f"score {chain['match']['score']:.3f}, rank {chain['match']['rank']}, chunk {chain['match']['chunk']}",
        "template": _md_cell(t["template"], 120),
        "query": f"{q['source']}: {_md_cell(q['text'], 120)}",
        "document": f"{chain['document']['url']} ({chain['document']['source_file']} row "
                    f"{chain['document']['source_row']})",
    }
    lines = [f"### Pair `{p['pair_id']}`", "",
             f"**Instruction:** {_md_cell(p['instruction'], 600)}", "",
             f"**Answer:** {_md_cell(p['answer'], 600)}", "",
             "| step | id | what | produced by run | asset partition |", "|---|---|---|---|---|"]
    for step, key, column, asset, by_shard in _STEPS:
        part = shard if by_shard else partition_of.get(step)
        where = f"[{asset}[{part}]](/assets/{asset}?view=partitions&partition={part})" if part else \
            f"[{asset}](/assets/{asset})"
        run = run_of[step]
        lines.append(f"| {step} | `{chain[key][column]}` | {detail[step]} | [{run[:8]}](/runs/{run}) | {where} |")
    g = t["genericization"]
    lines += ["", f"Template from the genericizer run [{g['run_id'][:8]}](/runs/{g['run_id']}) "
              f"([templates[{q['source']}]](/assets/templates?view=partitions&partition={q['source']})), "
              f"model {g['model']}.", "", f"**Document text:** {_md_cell(chain['document']['text'], 800)}"]
    return "\n".join(lines)
