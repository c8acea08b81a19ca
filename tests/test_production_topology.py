"""The production topology as local processes (what docker-compose.yml runs in containers): Debian's
PostgreSQL for Dagster's storage, a moto S3 server as the data store, the user code served by
`dagster api grpc`, `dagster-webserver` and `dagster-daemon` with deploy/dagster.yaml and deploy/workspace.yaml.

The corpus is an s3:// prefix. With the automation sensor turned on (as an operator does once in the UI), the
daemon alone takes the shards in the bucket to their exports: the sensors add the partitions and run the first
steps, declarative automation the rest (dedup, each shard's chain, the dbt build, the export once the dbt tests
passed). Then a new shard file lands in the bucket and reaches its export the same way, while the older shards'
chains and exports are not run again. Every partition is materialized exactly once, no run fails, the pairs land in
the bucket and trace back to their documents from a fresh working copy, and step logs are in the bucket too.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow]  # starts Postgres, moto, a code server, the webserver and the daemon

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LOCATION = "fineinstructions_dagster"
BUCKET = "fineinstructions"
CORPUS_PREFIX = "inputs/corpus"
TIMEOUT = 900  # the whole graph through queued runs on 2 cores: a few minutes


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_tool(name: str) -> str:
    """Debian keeps the server binaries out of PATH, under /usr/lib/postgresql/<version>/bin."""
    found = shutil.which(name) or next(iter(sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))), None)
    if found is None:
        pytest.fail(f"PostgreSQL's {name} is not installed (Debian package postgresql; `make setup` installs it)")
    return str(found)


def as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: use the postgres account the Debian package creates."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def wait_for(what: str, ready: Callable[[], bool], timeout: float, procs: list[subprocess.Popen]) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{p.args[0]} exited with {p.returncode} while waiting for {what}")
        try:
            if ready():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(1)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s")


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=10)  # the test is over: a server slow to stop is killed, not waited for
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    # A session of its own, so the whole process group (a server and its children) stops by PID.
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                            cwd=REPO)


class Topology:
    def __init__(self, env: dict[str, str], web: str, logs: Path):
        self.env, self.web, self.logs = env, web, logs

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        req = urllib.request.Request(f"{self.web}/graphql", data=json.dumps(
            {"query": query, "variables": variables or {}}).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            out = json.loads(r.read())
        if out.get("errors"):
            raise AssertionError(f"GraphQL errors: {out['errors']}")
        return out["data"]

    def runs(self) -> list[dict]:
        data = self.graphql("""{ runsOrError { ... on Runs { results {
            runId status jobName assetSelection { path } tags { key value } } } } }""")
        return data["runsOrError"]["results"]

    def ticks(self, sensor: str, after: float) -> list[dict]:
        """The sensor's finished ticks that started after `after` (a Unix time), newest first."""
        data = self.graphql("""query($s: SensorSelector!, $after: Float) { sensorOrError(sensorSelector: $s) {
            ... on Sensor { sensorState { ticks(limit: 20, afterTimestamp: $after) {
                status timestamp skipReason requestedAssetKeys { path } } } } } }""",
                            {"s": {"repositoryLocationName": LOCATION, "repositoryName": "__repository__",
                                   "sensorName": sensor}, "after": after})
        return [t for t in data["sensorOrError"]["sensorState"]["ticks"] if t["status"] != "STARTED"]

    def tail(self) -> str:
        return "\n".join(f"--- {f.name}\n" + f.read_text()[-3000:] for f in sorted(self.logs.glob("*.log")))


@pytest.fixture(scope="module")
def topology(tmp_path_factory, smoke_model, sample_inputs) -> Iterator[Topology]:
    import boto3

    base = tmp_path_factory.mktemp("topology")
    logs = base / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []
    pg_port, s3_port, grpc_port, web_port = free_port(), free_port(), free_port(), free_port()

    # PostgreSQL: a throw-away cluster (trust auth on loopback only, fsync off: test data).
    # Outside pytest's tmp folders: those are private to the user running the tests (0700).
    pgdata = Path(tempfile.mkdtemp(prefix="fineinstructions-pg-"))
    try:  # whatever started is stopped, also when a later server fails to come up
        if os.geteuid() == 0:
            shutil.chown(pgdata, "postgres", "postgres")
        subprocess.run(as_postgres([pg_tool("initdb"), "-D", str(pgdata), "-A", "trust", "-U", "dagster", "-N"]),
                       check=True, capture_output=True)
        procs.append(start(as_postgres([pg_tool("postgres"), "-D", str(pgdata), "-h", "127.0.0.1", "-p", str(pg_port),
                                        "-k", str(pgdata), "-F"]), dict(os.environ), logs / "postgres.log"))
        wait_for("postgres", lambda: subprocess.run(
            [pg_tool("pg_isready"), "-h", "127.0.0.1", "-p", str(pg_port)], capture_output=True).returncode == 0,
            60, procs)
        subprocess.run([pg_tool("createdb"), "-h", "127.0.0.1", "-p", str(pg_port), "-U", "dagster", "dagster"],
                       check=True, capture_output=True)

        # S3: moto's standalone server, the bucket created as an operator would.
        procs.append(start([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)], dict(os.environ),
                           logs / "moto.log"))
        endpoint = f"http://127.0.0.1:{s3_port}"
        creds = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
        wait_for("moto", lambda: urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).status == 200, 60, procs)
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
                          aws_secret_access_key="test")
        s3.create_bucket(Bucket=BUCKET)
        for f in sorted((sample_inputs / "corpus").iterdir()):  # the corpus as shard files under a prefix
            s3.upload_file(str(f), BUCKET, f"{CORPUS_PREFIX}/{f.name}")

        home = base / "dagster_home"
        home.mkdir()
        shutil.copy(REPO / "deploy" / "dagster.yaml", home / "dagster.yaml")
        env = {**os.environ, **creds, "DAGSTER_HOME": str(home),
               "DAGSTER_PG_USER": "dagster", "DAGSTER_PG_PASSWORD": "unused-trust-auth", "DAGSTER_PG_HOST": "127.0.0.1",
               "DAGSTER_PG_PORT": str(pg_port), "DAGSTER_PG_DB": "dagster",
               "FINEINSTRUCTIONS_S3_BUCKET": BUCKET, "DAGSTER_USER_CODE_HOST": "127.0.0.1",
               "DAGSTER_USER_CODE_PORT": str(grpc_port),
               "FINEINSTRUCTIONS_ROOT": f"s3://{BUCKET}/data",
               "FINEINSTRUCTIONS_CACHE_DIR": str(base / "user_code_cache"),
               "FINEINSTRUCTIONS_QUERIES": str(sample_inputs / "queries"),
               "FINEINSTRUCTIONS_CORPUS": f"s3://{BUCKET}/{CORPUS_PREFIX}", "FINEINSTRUCTIONS_PROFILE": "smoke",
               "FINEINSTRUCTIONS_SMOKE_MODEL": str(smoke_model), "FINEINSTRUCTIONS_LLM_BACKEND": "transformers",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DAGSTER_DISABLE_TELEMETRY": "1",
               "FINEINSTRUCTIONS_BACKFILL_CRON": "* * * * *"}  # the scheduled backfill's tick: every minute
        workspace = str(REPO / "deploy" / "workspace.yaml")
        procs.append(start([str(BIN / "dagster"), "api", "grpc", "-h", "127.0.0.1", "-p", str(grpc_port),
                            "-m", "fineinstructions_dagster.definitions"], env, logs / "grpc.log"))
        wait_for("user-code gRPC server", lambda: subprocess.run(
            [str(BIN / "dagster"), "api", "grpc-health-check", "-p", str(grpc_port)], env=env,
            capture_output=True).returncode == 0, 120, procs)
        procs.append(start([str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(web_port), "-w", workspace],
                           env, logs / "webserver.log"))
        procs.append(start([str(BIN / "dagster-daemon"), "run", "-w", workspace], env, logs / "daemon.log"))
        web = f"http://127.0.0.1:{web_port}"
        wait_for("webserver", lambda: urllib.request.urlopen(f"{web}/server_info", timeout=2).status == 200, 120, procs)
        yield Topology(env, web, logs)
    finally:
        for i, p in reversed(list(enumerate(procs))):
            stop(p, signal.SIGINT if i == 0 else signal.SIGTERM)  # postgres (first): SIGINT is its fast shutdown
        shutil.rmtree(pgdata, ignore_errors=True)


def wait_until(topo: Topology, what: str, done: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if done():
            return
        failed = [r for r in topo.runs() if r["status"] in ("FAILURE", "CANCELED")]
        if failed:
            raise AssertionError(f"runs failed while waiting for {what}: {failed}\n{topo.tail()}")
        time.sleep(3)
    raise AssertionError(f"timed out waiting for {what}: runs {topo.runs()}\n{topo.tail()}")


def idle(instance) -> bool:  # noqa: ANN001 - DagsterInstance
    from dagster import DagsterRunStatus, RunsFilter
    from dagster._core.execution.backfill import BulkActionsFilter, BulkActionStatus

    busy = [DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING,
            DagsterRunStatus.STARTED]
    return not instance.get_runs(RunsFilter(statuses=busy), limit=1) and not instance.get_backfills(
        filters=BulkActionsFilter(statuses=[BulkActionStatus.REQUESTED]), limit=1)


PER_SHARD = ["filtered_documents", "documents", "matches", "instantiations", "judgements", "fineinstructions",
             "export_chat", "export_packed"]
SHARDS = ["faq", "tutorial"]


def test_the_daemon_alone_takes_each_shard_in_the_bucket_to_its_export_once(topology, monkeypatch, tmp_path):
    import boto3
    import polars as pl
    from dagster import AssetKey, DagsterInstance

    from fineinstructions_dagster.definitions import defs
    from fineinstructions_dagster.defs.automation import PAIRS
    from fineinstructions_dagster.defs.quality.assets import dbt_quality
    from fineinstructions_dagster.lib.storage import TableStore
    from fineinstructions_dagster.sample import build_sample
    from fineinstructions_dagster.stages.dedup import bucket_range_keys
    from fineinstructions_dagster.stages.lineage import trace_pair

    topo = topology
    for k, v in topo.env.items():  # this process reads the same instance and bucket; undone after the test
        if k.startswith(("DAGSTER_PG_", "AWS_", "FINEINSTR")):
            monkeypatch.setenv(k, v)
    # 1. Turn on declarative automation, once, as in the UI (Automation -> automation_sensor -> on).
    started = topo.graphql("""mutation($s: SensorSelector!) { startSensor(sensorSelector: $s) { __typename
        ... on Sensor { sensorState { status } } ... on PythonError { message } } }""", {"s": {
        "repositoryLocationName": LOCATION, "repositoryName": "__repository__", "sensorName": "automation_sensor"}})
    assert started["startSensor"]["sensorState"]["status"] == "RUNNING", started

    with DagsterInstance.from_config(topo.env["DAGSTER_HOME"]) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"

        def materialized(asset: str) -> list[str]:
            records = instance.fetch_materializations(AssetKey(asset.split("/")), limit=1000).records
            return sorted(r.partition_key or "-" for r in records)

        def exported(shards: list[str]) -> bool:
            return set(shards) <= set(materialized("export_chat"))

        # 2. The shards already in the bucket: sensors + automation, no other run.
        wait_until(topo, "both shards' exports", lambda: exported(SHARDS))
        for asset in PER_SHARD:
            assert materialized(asset) == SHARDS, asset
        assert materialized("duplicate_edges") == sorted(bucket_range_keys())

        # 3. A new shard lands in the bucket: a few documents of its own and an exact copy of a faq document.
        build_sample(tmp_path / "more", shards=("howto",), max_docs_per_shard=4)
        howto = pl.read_parquet(tmp_path / "more" / "corpus" / "howto.parquet")
        faq_doc = TableStore(f"s3://{BUCKET}/data", working_copy=tmp_path / "w1").read("documents", "faq").row(
            0, named=True)
        copy = {**howto.row(0, named=True), "id": "copy-of-faq", "url": "https://mirror.example/faq",
                "text": faq_doc["text"]}
        pl.concat([howto, pl.DataFrame([copy])]).write_parquet(tmp_path / "howto.parquet")
        boto3.client("s3").upload_file(str(tmp_path / "howto.parquet"), BUCKET, f"{CORPUS_PREFIX}/howto.parquet")
        wait_until(topo, "the new shard's export", lambda: exported(["howto"]))
        # Nothing else may follow: once no run or backfill is left, the next automation tick requests no step of
        # a shard (it may re-make dataset_report, which summarises every table).
        wait_until(topo, "no run or backfill in progress", lambda: idle(instance))
        quiet_since = time.time()
        wait_until(topo, "an automation tick after the last run", lambda: topo.ticks("automation_sensor",
                                                                                     quiet_since))
        for tick in topo.ticks("automation_sensor", quiet_since):
            assert {"/".join(k["path"]) for k in tick["requestedAssetKeys"]} <= {"dataset_report"}, tick
        for asset in PER_SHARD:  # the older shards' chains and exports were not run again
            assert materialized(asset) == sorted([*SHARDS, "howto"]), asset
        assert materialized("duplicate_edges") == sorted(bucket_range_keys() * 2)  # once per arrival
        assert materialized("document_clusters") == ["-", "-"]
        # the dbt models over a shard's tables are built in one run per arrival, once its chain's run is done
        graph = defs.resolve_asset_graph()
        shard_models = [k for k in dbt_quality.keys if AssetKey(PAIRS) in graph.get(k).parent_keys]
        builds = {m.to_user_string(): {r.run_id for r in instance.fetch_materializations(m, limit=100).records}
                  for m in shard_models}
        assert len(builds["quality/pairs"]) == 2 and all(b == builds["quality/pairs"] for b in builds.values()), \
            builds
        assert all(r["status"] == "SUCCESS" for r in topo.runs()), topo.runs()

    # 4. The data is in the bucket: a fresh working copy reads the pairs and traces one to its document; the
    # newcomer's copy of the faq document was removed naming it.
    s3 = boto3.client("s3")
    keys = {o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
            for o in page.get("Contents", [])}
    for shard in [*SHARDS, "howto"]:
        assert f"data/fineinstructions/{shard}.parquet" in keys and f"data/export_chat/{shard}.parquet" in keys
    assert any(k.startswith("dagster-logs/") for k in keys), "step logs were not uploaded to S3"
    store = TableStore(f"s3://{BUCKET}/data", working_copy=tmp_path / "w2")
    pairs = pl.read_parquet(store.glob("fineinstructions"))
    assert pairs.height > 0 and pairs["pair_id"].is_unique().all()
    chain = trace_pair(store, pairs["pair_id"][0])
    assert chain["document"]["text"] and chain["query"]["text"]
    removed = store.read("document_clusters", "howto")
    assert removed.filter(pl.col("duplicate_of") == faq_doc["doc_id"]).height == 1

    # 5. The scheduled backfill instead of eager automation: automation off, `scheduled_backfill` on (its cron
    # every minute here); tutorial's file replaced in place (the same rows, written again: a new ETag).
    for command in (["stop", "automation_sensor"], ["start", "scheduled_backfill"]):
        subprocess.run([str(BIN / "dagster"), "sensor", *command, "-w", str(REPO / "deploy" / "workspace.yaml")],
                       env=topo.env, check=True, capture_output=True, timeout=120)
    local = tmp_path / "tutorial.parquet"
    boto3.client("s3").download_file(BUCKET, f"{CORPUS_PREFIX}/tutorial.parquet", str(local))
    pl.read_parquet(local).write_parquet(tmp_path / "again.parquet", compression="gzip")
    boto3.client("s3").upload_file(str(tmp_path / "again.parquet"), BUCKET, f"{CORPUS_PREFIX}/tutorial.parquet")
    from dagster._core.execution.backfill import BulkActionsFilter, BulkActionStatus

    from fineinstructions_dagster.defs.scheduled_backfill import SCHEDULED_TAG

    with DagsterInstance.from_config(topo.env["DAGSTER_HOME"]) as instance:
        def scheduled() -> list:  # noqa: ANN202 - PartitionBackfills
            return instance.get_backfills(filters=BulkActionsFilter(tags={SCHEDULED_TAG: "true"}))

        wait_until(topo, "the scheduled backfill", lambda: len(scheduled()) == 1
                   and scheduled()[0].status != BulkActionStatus.REQUESTED, timeout=600)
        assert scheduled()[0].status in (BulkActionStatus.COMPLETED, BulkActionStatus.COMPLETED_SUCCESS), scheduled()
        done = time.time()
        # the sensor's next cron tick finds nothing new or stale, so there is no second backfill
        wait_until(topo, "a scheduled_backfill tick with nothing due", lambda: any(
            "nothing new or stale" in (t["skipReason"] or "") for t in topo.ticks("scheduled_backfill", done)),
            timeout=180)
        assert len(scheduled()) == 1, scheduled()
        for asset in PER_SHARD:  # tutorial's chain and export again, nothing of faq's or howto's
            records = instance.fetch_materializations(AssetKey(asset), limit=1000).records
            assert sorted(r.partition_key for r in records) == sorted([*SHARDS, "howto", "tutorial"]), asset
