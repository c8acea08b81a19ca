"""Partitions definitions, defined once and imported everywhere, and the scan that adds new keys."""

import warnings

from dagster import (
    AssetKey,
    BackfillPolicy,
    BetaWarning,
    DynamicPartitionsDefinition,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    StaticPartitionsDefinition,
)

from fineinstructions_dagster.stages.dedup import bucket_range_keys

query_source_partitions = DynamicPartitionsDefinition(name="query_source")
corpus_shard_partitions = DynamicPartitionsDefinition(name="corpus_shard")
# Ranges of LSH buckets: the dedup step's unit of work, fixed whatever the number of shards.
bucket_range_partitions = StaticPartitionsDefinition(bucket_range_keys())
# Dagster's partition-range tags for one run over every bucket range (as a single-run backfill launches it).
EVERY_BUCKET_RANGE = {"dagster/asset_partition_range_start": bucket_range_keys()[0],
                      "dagster/asset_partition_range_end": bucket_range_keys()[-1]}

# Backfill policies are beta in Dagster 1.13 (a warning per asset otherwise); the assets importing this set them.
warnings.filterwarnings("ignore", category=BetaWarning, message=".*backfill_policy.*")

# A backfill runs up to this many partitions of an asset in one run, so the LLM (and embedder) loads once
# per run rather than once per partition; set on every asset partitioned by shard or source.
PARTITIONS_PER_RUN = 8
batched_backfill = BackfillPolicy.multi_run(max_partitions_per_run=PARTITIONS_PER_RUN)


def add_new_partitions(context: SensorEvaluationContext, found: dict[str, list[str]],
                       partitions: DynamicPartitionsDefinition,
                       assets: list[str]) -> SensorResult | SkipReason:
    """Add a partition for every input not yet known and request one run for each new key."""
    assert partitions.name is not None
    known = set(context.instance.get_dynamic_partitions(partitions.name))
    new = sorted(k for k in found if k not in known)
    if not new:
        return SkipReason(f"no new {partitions.name} ({len(found)} known)")
    return SensorResult(
        run_requests=[
            RunRequest(run_key=f"{partitions.name}:{k}", partition_key=k,
                       asset_selection=[AssetKey(a) for a in assets])
            for k in new
        ],
        dynamic_partitions_requests=[partitions.build_add_request(new)],
    )


def shards_to_refresh(shards: list[str], latest: dict[str, dict[str, int]], shared: dict[str, int | None],
                      chain: list[str], shared_inputs: dict[str, list[str]],
                      per_shard: dict[str, dict[str, int]] | None = None) -> dict[str, tuple[str, int]]:
    """Shards whose chain is missing a step or has a step older than its input.

    `latest[asset][shard]`: storage id (the event log's ever-increasing id, so comparable across assets) of
    the asset's latest materialization of that shard; `shared[name]`: the same for an unpartitioned input;
    `per_shard[name][shard]`, where given, replaces it for an unpartitioned input that changes shard by shard
    (the dedup removal lists: a new shard's decisions do not make the other shards stale).
    The first asset of `chain` is the source: a shard without it is left to the shard sensor. Returns
    shard -> (reason, newest storage id seen), the id standing for "this upstream state".
    """
    todo: dict[str, tuple[str, int]] = {}
    for shard in shards:
        ids = [latest.get(a, {}).get(shard) for a in chain]
        if ids[0] is None:
            continue
        # The state names the inputs only (source and shared assets), not the chain's own outputs, so a run
        # still writing its steps does not make the next tick ask again under a new key.
        state = max([ids[0]] + [s for s in shared.values() if s is not None])
        reason = None
        for k in range(1, len(chain)):
            asset, cur = chain[k], ids[k]
            inputs = [ids[k - 1]] + [(per_shard[n].get(shard) if per_shard and n in per_shard else shared.get(n))
                                     for n in shared_inputs.get(asset, [])]
            if cur is None:
                reason = f"{asset} missing"
            elif any(i is not None and i > cur for i in inputs):
                reason = f"{asset} older than its inputs"
            if reason:
                break
        if reason:
            todo[shard] = (reason, state)
    return todo


def exports_to_refresh(shards: list[str], pairs: dict[str, int], exports: dict[str, int],
                       quality: int | None, other_inputs: int | None = None) -> tuple[bool, list[str]]:
    """After the chain: (dbt quality must run first, shards whose export is missing or older than its pairs).
    A dbt build alone does not make an export stale: its pairs did not change. The build is due when it is
    older than a stale shard's pairs or than `other_inputs` (the newest bank / queries the tests also read:
    the export gate would refuse it otherwise). Storage ids as in `shards_to_refresh`."""
    stale = [s for s in shards if s in pairs and (s not in exports or exports[s] < pairs[s])]
    need_quality = bool(stale) and (quality is None or any(pairs[s] > quality for s in stale)
                                    or (other_inputs is not None and other_inputs > quality))
    return need_quality, ([] if need_quality else stale)


def shared_steps_to_refresh(filtered: dict[str, int], clusters: int | None, bank: int | None,
                            index: int | None) -> list[str]:
    """Shared steps the shard chain needs first: the dedup step (`document_clusters`, after every bucket range)
    when a shard was (re-)filtered after it (a new shard has no dedup decision yet), the template index when
    the bank is newer."""
    todo = []
    if filtered and (clusters is None or max(filtered.values()) > clusters):
        todo.append("document_clusters")
    if bank is not None and (index is None or bank > index):
        todo.append("template_index")
    return todo
