"""`lineage_job`: launched from the UI with a `pair_id`, it traces the pair back through every stage and
shows the chain as markdown (with links to each step's run and asset partition) on the run and on the
pair's `fineinstructions` partition."""

from dagster import AssetKey, AssetObservation, Config, Failure, MetadataValue, OpExecutionContext, job, op

from fineinstructions_dagster.defs.resources import StorageResource
from fineinstructions_dagster.stages.lineage import LineageError, format_lineage, lineage_markdown, trace_pair


class PairConfig(Config):
    pair_id: str


@op(description="Trace one final pair to its judgement, instantiation, match, template, query and document.")
def trace_pair_lineage(context: OpExecutionContext, config: PairConfig, storage: StorageResource) -> None:
    try:
        chain = trace_pair(storage.store(), config.pair_id.strip())
    except LineageError as e:
        raise Failure(description=str(e)) from e
    context.log.info("lineage of pair %s\n%s", config.pair_id, format_lineage(chain))
    pair = chain["pair"]
    context.log_event(AssetObservation(
        asset_key=AssetKey("fineinstructions"), partition=pair["shard"],
        description=f"lineage of pair {pair['pair_id']}",
        metadata={"pair_id": pair["pair_id"], "lineage": MetadataValue.md(lineage_markdown(chain)),
                  **{f"{k}_run": MetadataValue.dagster_run(v) for k, v in chain["runs"].items()}}))


@job(description="Show the full lineage of one pair: set `ops.trace_pair_lineage.config.pair_id`.")
def lineage_job() -> None:
    trace_pair_lineage()
