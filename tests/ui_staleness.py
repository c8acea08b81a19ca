"""What the Dagster UI shows as stale: the webserver's GraphQL (`staleStatus`, `staleCauses`, per partition), asked
in process over the code location loaded here, against a test's instance."""

from __future__ import annotations

from dagster import DagsterInstance
from dagster._core.remote_origin import InProcessCodeLocationOrigin
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget
from dagster_graphql.test.utils import execute_dagster_graphql

NODES = "{ assetNodes { assetKey { path } isMaterializable isPartitioned } }"
PARTITIONED = """query ($keys: [AssetKeyInput!]) { assetNodes(assetKeys: $keys) { assetKey { path } partitionKeys
  staleStatusByPartition staleCausesByPartition { key { path } reason dependency { path } } } }"""
UNPARTITIONED = """query ($keys: [AssetKeyInput!]) { assetNodes(assetKeys: $keys) { assetKey { path }
  staleStatus staleCauses { key { path } reason dependency { path } } } }"""


def _ask(context, query: str, variables: dict | None = None) -> list[dict]:  # noqa: ANN001 - a request context
    result = execute_dagster_graphql(context, query, variables)
    assert not result.errors, result.errors
    return result.data["assetNodes"]


def _cause(cause: dict) -> str:
    """'<asset> <reason>[ (<dependency>)]', as the UI words a cause (the asset: where it starts)."""
    dep = cause.get("dependency")
    said = f"{'/'.join(cause['key']['path'])} {cause['reason']}"
    return f"{said} ({'/'.join(dep['path'])})" if dep else said


def ui_stale(instance: DagsterInstance) -> dict[tuple[str, str | None], list[str]]:
    """(asset, partition) -> its stale causes, for every materializable asset partition the UI marks STALE."""
    target = LoadableTargetOrigin(module_name="fineinstructions_dagster.definitions", attribute="defs")
    origin = InProcessCodeLocationOrigin(target, location_name="fineinstructions_dagster")
    with WorkspaceProcessContext(instance, InProcessWorkspaceLoadTarget(origin)) as process:
        context = process.create_request_context()
        nodes = [n for n in _ask(context, NODES) if n["isMaterializable"]]
        out: dict[tuple[str, str | None], list[str]] = {}
        for partitioned, query in ((True, PARTITIONED), (False, UNPARTITIONED)):
            keys = [{"path": n["assetKey"]["path"]} for n in nodes if n["isPartitioned"] == partitioned]
            for node in _ask(context, query, {"keys": keys}):
                name = "/".join(node["assetKey"]["path"])
                if partitioned:
                    rows = zip(node["partitionKeys"], node["staleStatusByPartition"], node["staleCausesByPartition"],
                               strict=True)
                else:
                    rows = [(None, node["staleStatus"], node["staleCauses"])]
                for partition, status, causes in rows:
                    if status == "STALE":
                        out[(name, partition)] = [_cause(c) for c in causes]
        return out
