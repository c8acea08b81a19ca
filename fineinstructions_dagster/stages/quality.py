"""The dbt quality gates' plain logic: the dbt vars a run's settings give, and how failures read. No Dagster or
dbt imports."""

from __future__ import annotations

from fineinstructions_dagster.config import PipelineConfig
from fineinstructions_dagster.stages.decontamination import SEPARATOR_CLASS

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
                 "judgements", "control_judgements")


def dbt_vars(cfg: PipelineConfig) -> dict[str, float | int | str]:
    """The `--vars` of `dbt build` for a run's settings: the dataset-level gates (each pair carries the judge and
    grounding thresholds it was selected under, and the tests read those)."""
    return {
        "judge_min_score": JUDGE_SCALE[0],
        "judge_max_score": JUDGE_SCALE[1],
        "max_template_share": float(cfg.max_template_share),
        "template_share_min_pairs": TEMPLATE_SHARE_MIN_PAIRS,
        "benchmark_ngram": cfg.decontamination.ngram,
        "benchmark_separators": SEPARATOR_CLASS,
    }


def describe_failed_checks(shard: str, failed: list[tuple[str, str]]) -> str:
    """Why the export of a shard was refused: (check, status) of each blocking check whose latest evaluation did
    not pass, status one of failed / never evaluated / not finished (a build in progress)."""
    lines = [f"pretraining_export [{shard}] not run: {len(failed)} blocking check(s) of its inputs did not pass "
             "on their latest evaluation:"]
    lines += [f"  - {name} ({status})" for name, status in failed]
    if all(status == "not finished" for _, status in failed):
        lines.append("A dbt build is in progress and has not evaluated them yet: the data is not known to be "
                     "wrong. Run the export again once it has finished (automation does so by itself).")
    else:
        lines.append("Fix the data (or the thresholds), run quality_job (dbt build) again; the export follows.")
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
