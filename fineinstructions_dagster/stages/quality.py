"""The dbt quality gates' plain logic: the dbt vars a run's settings give, and whether the export of a shard
may go ahead given the latest evaluation of every dbt test. No Dagster or dbt imports."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from fineinstructions_dagster.config import PipelineConfig

# The judge's Likert scale: stages/judging.py (parse_score) keeps only whole scores in 1..5.
JUDGE_SCALE = (1, 5)
# No template may account for more than this share of all pairs, once there are TEMPLATE_SHARE_MIN_PAIRS pairs.
# The demo's largest share is about 0.10 (50 templates over 208 pairs, three shards), so 0.2 leaves it twice the
# room; a larger share means matching collapsed onto a hub template. The test sample (about 40 pairs over 14
# templates) reaches 0.24 by chance, which is why a minimum applies: shares of a few dozen pairs are noise.
# At paper scale (millions of templates) a far lower cap (e.g. 0.01) is the meaningful one.
DEFAULT_MAX_TEMPLATE_SHARE = PipelineConfig.max_template_share  # the config's default, for tests and docs
TEMPLATE_SHARE_MIN_PAIRS = 50

# The tables the dbt project reads (its sources), i.e. the assets its models sit downstream of.
SOURCE_TABLES = ("fineinstructions", "template_bank", "user_queries", "documents", "matches", "instantiations",
                 "judgements")


def dbt_vars(cfg: PipelineConfig) -> dict[str, float | int]:
    """The `--vars` of `dbt build` for a run's settings: the dataset-level gates (each pair carries the judge and
    grounding thresholds it was selected under, and the tests read those)."""
    return {
        "judge_min_score": JUDGE_SCALE[0],
        "judge_max_score": JUDGE_SCALE[1],
        "max_template_share": float(cfg.max_template_share),
        "template_share_min_pairs": TEMPLATE_SHARE_MIN_PAIRS,
    }


@dataclass(frozen=True)
class CheckEvaluation:
    """The latest evaluation of one dbt test: `passed` None when it has no completed result (never run, or its
    latest run is in progress, failed or skipped it); `evaluated_at` a Unix timestamp no later than the moment
    dbt read the tables (the start of the run that evaluated it); `failed_rows` as dbt counted them."""

    name: str
    passed: bool | None
    evaluated_at: float | None
    description: str = ""
    failed_rows: int | None = None
    # The pipeline table its model reads and when that was last materialized: a test needs to be newer than
    # its own input only (a test of the documents model need not re-run because the pairs changed).
    reads: str = ""
    reads_materialized_at: float | None = None
    # Event-log storage ids (they only grow, so they order events exactly, also within one run): of the model
    # materialization the test evaluated, and of the input's latest materialization. Used when both are known.
    evaluated_seq: int | None = None
    reads_seq: int | None = None


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass(frozen=True)
class BlockReason:
    """One dbt test that keeps the export of a shard from running, and why."""

    test: str
    reason: str

    def __str__(self) -> str:
        return f"{self.test} {self.reason}" if self.test else self.reason


def export_block_reasons(checks: list[CheckEvaluation], pairs_materialized_at: float | None,
                         shard: str = "") -> list[BlockReason]:
    """Why the export of a shard must not run, one reason per dbt test at fault (empty: it may run).

    A test is at fault when its latest evaluation failed, when it has none, or when that evaluation is older than
    the latest materialization of the table its model reads (`reads`; by default the shard's `fineinstructions`):
    it judged other rows than the ones the export would ship."""
    if not checks:
        return [BlockReason("", "no dbt quality tests are defined, so the export has no gate")]
    where = f"fineinstructions [{shard}]" if shard else "fineinstructions"
    reasons = []
    for c in sorted(checks, key=lambda c: c.name):
        about = f": {c.description.strip()}" if c.description.strip() else ""
        if c.passed is False:
            rows = f" ({c.failed_rows} failing row{'s' if c.failed_rows != 1 else ''})" if c.failed_rows else ""
            reasons.append(BlockReason(c.name, f"failed{rows}{about}"))
        elif c.passed is None or c.evaluated_at is None:
            reasons.append(BlockReason(c.name, "has no completed evaluation (never run, or its latest run did "
                                               "not finish it)"))
        else:
            what, at = (c.reads, c.reads_materialized_at) if c.reads else (where, pairs_materialized_at)
            if c.reads and c.evaluated_seq is not None and c.reads_seq is not None:
                stale = c.evaluated_seq < c.reads_seq
            else:
                stale = at is not None and c.evaluated_at < at
            if stale and at is not None:
                reasons.append(BlockReason(c.name, f"was last evaluated at {_when(c.evaluated_at)}, before {what} "
                                                   f"was materialized at {_when(at)}"))
    return reasons


def describe_block(shard: str, reasons: list[BlockReason], rerun_hint: str = "quality_job") -> str:
    """The Failure description of a blocked export: every reason, then what to do."""
    lines = [f"pretraining_export [{shard}] is blocked by {len(reasons)} dbt quality gate(s):"]
    lines += [f"  - {r}" for r in reasons]
    lines.append(f"Fix the data (or the thresholds), re-run {rerun_hint} (dbt build) and materialize the export "
                 "again.")
    return "\n".join(lines)


def _node_name(unique_id: str) -> str:
    """`test.<project>.<name>.<hash>` -> name; `model.<project>.<name>` -> `model <name>`."""
    parts = unique_id.split(".")
    kind, name = parts[0], parts[2] if len(parts) > 2 else unique_id
    return name if kind == "test" else f"{kind} {name}"


def summarize_dbt_failures(results: list[dict]) -> list[str]:
    """One line per node of a dbt run_results.json that did not pass: failed tests (with their failing rows),
    errors (with the first line of dbt's message), and one line counting skipped nodes. Warnings pass."""
    lines, skipped = [], 0
    for r in sorted(results, key=lambda r: str(r.get("unique_id"))):
        status, name = str(r.get("status")), _node_name(str(r.get("unique_id")))
        if status == "fail":
            n = r.get("failures")
            lines.append(f"{name} failed" + (f" ({n} failing row{'s' if n != 1 else ''})" if n else ""))
        elif status in ("error", "runtime error"):
            message = str(r.get("message") or "").strip().splitlines()
            detail = next((m.strip() for m in message[1:] if m.strip()), message[0] if message else "")
            lines.append(f"{name} errored: {detail}" if detail else f"{name} errored")
        elif status == "skipped":
            skipped += 1
    if skipped:
        lines.append(f"{skipped} node(s) skipped (downstream of an error)")
    return lines
