"""When each asset runs by itself: Dagster's declarative automation conditions, evaluated by `automation_sensor`
(the daemon). The sensors add the new query sources and shards and run their first step; everything after
follows from these conditions. Nothing here reads the event log by hand."""

from dagster import (
    AssetKey,
    AssetSelection,
    AutomationCondition,
    AutomationConditionSensorDefinition,
    DefaultSensorStatus,
)

from fineinstructions_dagster.defs.settings import EXPORT_SETTINGS

PAIRS = "fineinstructions"
CLUSTERS = "document_clusters"
FILTER_OUTPUTS = ("filtered_documents", "document_signatures")
REMOVAL_LISTS = "removal_lists"  # each shard's dedup removal list, observed by the run that changed it


def shard_step() -> AutomationCondition:
    """A shard's chain (documents .. fineinstructions): as soon as an input of that shard (or a shared input: the
    dedup decisions, the template index or bank) was updated, once none of them is missing or in progress, and
    never while this partition is already requested or running."""
    return AutomationCondition.eager()


def input_files_replaced() -> AutomationCondition:
    """The steps a sensor runs first for a new input partition (`user_queries` and `templates`, the filter
    step): again once its files were replaced in place (their observation has a new data version), or its
    input was re-made for that reason. Not while missing: a new partition's first run is its sensor's."""
    return (AutomationCondition.any_deps_updated().since_last_handled()
            & ~AutomationCondition.missing()
            & ~AutomationCondition.any_deps_in_progress()
            & ~AutomationCondition.in_progress()).with_label("its input files replaced")


def _own_input_then_gate(own: tuple[str, ...], gate: AssetKey | str) -> AutomationCondition:
    """True once an `own` input (the same shard's) was updated since this partition was last requested and the
    `gate` input (unpartitioned, so rebuilt in a run of its own) was rebuilt after that: a step that must see
    the gate's result for its own new input, and not re-run when the gate is rebuilt for another shard. Only
    materializations count, not requests: a request for the gate cannot share this step's run, so Dagster
    would launch both at once."""
    own_updated = AutomationCondition.any_deps_match(AutomationCondition.newly_updated()).allow(
        AssetSelection.assets(*own))
    gate_rebuilt = AutomationCondition.any_deps_match(AutomationCondition.newly_updated()).allow(
        AssetSelection.assets(gate))
    return ((gate_rebuilt & own_updated.since(AutomationCondition.newly_requested())).since_last_handled()
            & ~AutomationCondition.any_deps_missing()
            & ~AutomationCondition.any_deps_in_progress()
            & ~AutomationCondition.in_progress())


def after_dedup_of_own_shard() -> AutomationCondition:
    """`documents` of a shard: once the dedup decisions were made after the shard's own filter output or its own
    removal list changed, not on every decision run: under the default `stable` rule a new shard's decisions
    leave the other shards' removal lists as they were, so their chains do not run again; under `rebuild` a
    shard whose list the run changed (a new `removal_lists` observation) runs again."""
    return _own_input_then_gate((*FILTER_OUTPUTS, REMOVAL_LISTS), CLUSTERS).with_label(
        "own shard filtered or its removal list changed, then dedup decided")


def over_every_partition() -> AutomationCondition:
    """A step that reads every partition of its inputs (template bank and index, bucket ranges, dedup components,
    dbt models, report): once an input was updated and none is in progress. Unlike `eager`, a missing input
    partition (a shard just added, or whose filter failed) does not hold everyone else back, and being missing
    itself is no reason to run (before the first source or shard there is nothing to summarise)."""
    return (AutomationCondition.any_deps_updated().since_last_handled()
            & ~AutomationCondition.any_deps_in_progress()
            & ~AutomationCondition.in_progress()).with_label("an input updated, none in progress")


def after_blocking_checks(pairs_model: AssetKey) -> AutomationCondition:
    """The export of a shard: once the dbt model over the pairs (`pairs_model`; the chain's last table, so its
    models are built last) was built after the shard's pairs were updated, and every blocking check of every
    dbt model (the export's deps) passed on its latest evaluation; a build for another shard's pairs exports
    nothing again, and a failing test holds the export until a later build passes. Unlike Dagster's
    `all_deps_blocking_checks_passed`, a check that will merely be requested this tick does not count: the dbt
    build and the export cannot share a run (partitioned and not), so they would start together."""
    checks_passed = AutomationCondition.all_deps_match(AutomationCondition.all_checks_match(
        AutomationCondition.check_passed(), blocking_only=True))
    # its own settings changed (tokenizer, sequence length): again, with the pairs as they are
    resettled = (AutomationCondition.any_deps_match(AutomationCondition.newly_updated()).allow(
        AssetSelection.assets(EXPORT_SETTINGS.key)).since_last_handled() & ~AutomationCondition.missing()
        & ~AutomationCondition.in_progress())
    return ((_own_input_then_gate((PAIRS,), pairs_model) | resettled) & checks_passed).with_label(
        "pairs updated (or its settings changed), then the dbt tests passed on them")


def with_its_asset(asset: AssetKey) -> AutomationCondition:
    """A check: executed in the run that materializes its asset (or after the asset was updated elsewhere); not
    when another model it also reads is built (a relationship test of the pairs must wait for the pairs)."""
    return AutomationCondition.any_deps_updated().allow(AssetSelection.assets(asset)).with_label("with its asset")


# The daemon's evaluator of the conditions above: stopped by default, so that nothing runs by itself on a laptop
# until asked; turn it on in the UI (Automation) or with `dagster sensor start automation_sensor`. It emits
# backfills, so the backfill policies batch what it requests.
automation_sensor = AutomationConditionSensorDefinition(
    "automation_sensor", target=AssetSelection.all(), default_status=DefaultSensorStatus.STOPPED,
    description="Runs what a new or changed input makes due: dedup, the shard's chain, the bank and index, the "
                "dbt build, the export once the dbt tests passed, the report.")
