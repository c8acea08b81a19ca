"""Static checks of the production deployment files (no container engine or Postgres needed; seconds).

docker-compose.yml, .env.example, Dockerfile, deploy/dagster.yaml, deploy/workspace.yaml and the ECS
snippet in docs/deployment.md are checked against the code and against Dagster's own config schemas.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
OURS = ("user_code", "webserver", "daemon")  # built from the repo's Dockerfile
DAGSTER_HOME = "/opt/dagster_home"

# Images other than ours, by repository; each must carry a pinned tag.
ALLOWED_IMAGES = {"postgres", "minio/minio", "minio/mc", "quay.io/minio/minio", "quay.io/minio/mc",
                  "vllm/vllm-openai"}
# FINEINSTRUCTIONS_* variables the compose file may use beyond those the code reads: the bucket (read by
# deploy/dagster.yaml for compute logs, and by compose to build FINEINSTRUCTIONS_ROOT) and the S3
# working-copy folder.
EXTRA_FINEINSTRUCTIONS_VARS = {"FINEINSTRUCTIONS_S3_BUCKET", "FINEINSTRUCTIONS_CACHE_DIR",
                               "FINEINSTRUCTIONS_EXPLORE_PORT"}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY(_ID)?$")
# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?message}, ${VAR?message}; `$${` is an escaped dollar.
REFERENCE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?([-?])([^}]*))?\}")

# Dummy values for every variable deploy/*.yaml reads.
DUMMY_ENV = {
    "DAGSTER_PG_USER": "dagster", "DAGSTER_PG_PASSWORD": "dummy", "DAGSTER_PG_HOST": "localhost",
    "DAGSTER_PG_DB": "dagster", "DAGSTER_PG_PORT": "5432", "FINEINSTRUCTIONS_S3_BUCKET": "bucket",
    "AWS_ENDPOINT_URL": "http://localhost:9000", "AWS_REGION": "us-east-1",
    "AWS_ACCESS_KEY_ID": "dummy", "AWS_SECRET_ACCESS_KEY": "dummy",
    "DAGSTER_USER_CODE_HOST": "user_code", "DAGSTER_USER_CODE_PORT": "4000",
}


def _env_refs(node: object) -> set[str]:
    """Names in Dagster `{env: NAME}` references anywhere in a parsed YAML document."""
    if isinstance(node, dict):
        if set(node) == {"env"} and isinstance(node["env"], str):
            return {node["env"]}
        return set().union(*(_env_refs(v) for v in node.values())) if node else set()
    if isinstance(node, list):
        return set().union(*(_env_refs(v) for v in node)) if node else set()
    return set()


def _compose_refs(node: object) -> list[tuple[str, str | None, str]]:
    """(name, operator, argument) of every ${...} in the compose file's values."""
    if isinstance(node, dict):
        return [r for v in node.values() for r in _compose_refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _compose_refs(v)]
    if isinstance(node, str):
        return [(m[1], m[2], m[3] or "") for m in REFERENCE.finditer(node)]
    return []


def _dollar_default(value: str) -> str:
    """The value compose gives `${VAR:-default}` when VAR is unset (a plain string is itself)."""
    m = REFERENCE.fullmatch(value)
    return m[3] if m and m[2] == "-" else value


@pytest.fixture
def deploy_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for k, v in DUMMY_ENV.items():
        monkeypatch.setenv(k, v)
    return DUMMY_ENV


# --- docker-compose.yml ------------------------------------------------------------------------------

def test_compose_has_exactly_the_platform_services():
    assert set(SERVICES) == {"postgres", "minio", "minio_init", "user_code", "webserver", "daemon", "explore",
                             "vllm"}


def test_vllm_is_only_in_the_gpu_profile_and_reserves_an_nvidia_gpu():
    assert SERVICES["vllm"]["profiles"] == ["gpu"]
    assert [n for n, s in SERVICES.items() if "profiles" in s] == ["vllm"]
    devices = SERVICES["vllm"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


def test_every_service_builds_the_repo_dockerfile_or_uses_a_pinned_allowed_image():
    assert (ROOT / "Dockerfile").is_file()
    for name, svc in SERVICES.items():
        if name in (*OURS, "explore"):
            assert svc.get("build") in (".", {"context": "."}), name
            assert "image" not in svc, name
            continue
        repo, _, tag = svc["image"].rpartition(":")
        assert repo in ALLOWED_IMAGES, f"{name}: {svc['image']} is not an allowed image"
        assert tag and tag != "latest" and "/" not in tag, f"{name}: image tag not pinned"


def test_no_literal_secrets_in_compose():
    """Every password / secret / token / key value is a ${...} reference with no non-empty default."""
    checked = 0
    for name, svc in SERVICES.items():
        for key, value in (svc.get("environment") or {}).items():
            if not SECRET_NAME.search(key):
                continue
            checked += 1
            m = REFERENCE.fullmatch(str(value))
            assert m, f"{name}.{key} must be a ${{...}} reference, not a literal"
            assert not (m[2] == "-" and m[3]), f"{name}.{key} has a literal default"
        for arg in svc.get("command") or []:
            assert not re.search(r"(?i)password\s*[=:]\s*\w", str(arg)), f"{name}: secret in command"
    assert checked >= 6
    # The required ones stop compose with a message when unset.
    required = {n for n, op, _ in _compose_refs(COMPOSE) if op == "?"}
    assert {"DAGSTER_PG_PASSWORD", "MINIO_ROOT_PASSWORD", "MINIO_ROOT_USER", "DAGSTER_PG_USER"} <= required


def test_our_commands_start_with_executables_from_the_venv():
    expected = {"user_code": "dagster", "webserver": "dagster-webserver", "daemon": "dagster-daemon"}
    for name, exe in expected.items():
        cmd = SERVICES[name]["command"]
        assert cmd[0] == exe, name
        assert (Path(sys.executable).parent / exe).exists(), f"{exe} is not installed in the venv"
    health = SERVICES["user_code"]["healthcheck"]["test"]
    assert health[1] == "dagster" and (Path(sys.executable).parent / "dagster").exists()


def test_grpc_server_serves_the_code_location_module():
    cmd = SERVICES["user_code"]["command"]
    assert cmd[:3] == ["dagster", "api", "grpc"]
    module = cmd[cmd.index("-m") + 1]
    assert module == "fineinstructions_dagster.definitions"
    assert importlib.util.find_spec(module) is not None
    port = cmd[cmd.index("-p") + 1]
    assert cmd[cmd.index("-h") + 1] == "0.0.0.0"
    for name in OURS:
        assert SERVICES[name]["environment"]["DAGSTER_USER_CODE_PORT"] == port
        assert SERVICES[name]["environment"]["DAGSTER_USER_CODE_HOST"] == "user_code"
    assert SERVICES["user_code"]["healthcheck"]["test"][-1] == port


def test_webserver_and_daemon_use_the_production_workspace_and_home():
    for name in ("webserver", "daemon"):
        cmd = SERVICES[name]["command"]
        assert cmd[cmd.index("-w") + 1] == f"{DAGSTER_HOME}/workspace.yaml", name
        assert SERVICES[name]["depends_on"]["user_code"]["condition"] == "service_healthy", name
    for name in OURS:
        assert SERVICES[name]["environment"]["DAGSTER_HOME"] == DAGSTER_HOME, name


def test_the_explorer_serves_the_data_root_on_loopback_and_links_to_the_ui():
    svc = SERVICES["explore"]
    assert svc["command"][:2] == ["fineinstructions", "explore"]
    assert (Path(sys.executable).parent / "fineinstructions").exists()
    (binding,) = svc["ports"]
    assert binding == "${DAGSTER_WEBSERVER_BIND:-127.0.0.1}:${FINEINSTRUCTIONS_EXPLORE_PORT:-8080}:8080"
    assert svc["command"][svc["command"].index("--port") + 1] == "8080"
    env = svc["environment"]
    assert env["FINEINSTRUCTIONS_ROOT"] == SERVICES["user_code"]["environment"]["FINEINSTRUCTIONS_ROOT"]
    assert env["FINEINSTRUCTIONS_DAGSTER_URL"].endswith(":${DAGSTER_WEBSERVER_PORT:-3000}")
    assert SERVICES["user_code"]["environment"]["FINEINSTRUCTIONS_EXPLORE_URL"].endswith(
        ":${FINEINSTRUCTIONS_EXPLORE_PORT:-8080}")


def test_webserver_port_binding_takes_its_host_from_the_environment():
    (binding,) = SERVICES["webserver"]["ports"]
    assert binding == "${DAGSTER_WEBSERVER_BIND:-127.0.0.1}:${DAGSTER_WEBSERVER_PORT:-3000}:3000"
    assert SERVICES["webserver"]["command"][SERVICES["webserver"]["command"].index("-p") + 1] == "3000"


def test_dagster_services_get_every_variable_the_instance_and_workspace_read():
    needed = _env_refs(yaml.safe_load((ROOT / "deploy/dagster.yaml").read_text()))
    needed |= _env_refs(yaml.safe_load((ROOT / "deploy/workspace.yaml").read_text()))
    assert needed >= {"DAGSTER_PG_USER", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_HOST", "DAGSTER_PG_DB",
                      "DAGSTER_PG_PORT", "FINEINSTRUCTIONS_S3_BUCKET", "AWS_ENDPOINT_URL",
                      "DAGSTER_USER_CODE_HOST", "DAGSTER_USER_CODE_PORT"}
    assert needed <= set(DUMMY_ENV)
    for name in OURS:
        env = SERVICES[name]["environment"]
        assert needed <= set(env), f"{name} lacks {sorted(needed - set(env))}"
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env), name


def test_fineinstructions_variables_in_compose_are_ones_the_code_reads():
    from fineinstructions_dagster.config import PAPER_MODELS
    from fineinstructions_dagster.defs.resources import ENV_DEFAULTS

    # build_resources() reads FINEINSTRUCTIONS_<ROLE>_MODEL for each model role.
    known = set(ENV_DEFAULTS) | {f"FINEINSTRUCTIONS_{role.upper()}_MODEL" for role in PAPER_MODELS}
    known |= EXTRA_FINEINSTRUCTIONS_VARS
    used = {n for n, _, _ in _compose_refs(COMPOSE)}
    for svc in SERVICES.values():
        used |= set(svc.get("environment") or {})
    unknown = sorted(n for n in used if n.startswith("FINEINSTRUCTIONS_") and n not in known)
    assert not unknown, f"compose sets variables the code does not read: {unknown}"
    env = SERVICES["user_code"]["environment"]
    assert env["FINEINSTRUCTIONS_ROOT"].startswith("s3://${FINEINSTRUCTIONS_S3_BUCKET")
    assert env["FINEINSTRUCTIONS_CACHE_DIR"] in [v.split(":")[1] for v in SERVICES["user_code"]["volumes"]]


def test_vllm_serves_the_model_user_code_asks_for_at_the_url_it_calls():
    cmd = SERVICES["vllm"]["command"]
    env = SERVICES["user_code"]["environment"]
    assert cmd[cmd.index("--served-model-name") + 1] == env["FINEINSTRUCTIONS_INSTANTIATOR_MODEL"]
    assert cmd[cmd.index("--model") + 1] == env["FINEINSTRUCTIONS_INSTANTIATOR_MODEL"]
    port = cmd[cmd.index("--port") + 1]
    assert _dollar_default(env["FINEINSTRUCTIONS_OPENAI_BASE_URL"]) == f"http://vllm:{port}/v1"
    assert _dollar_default(env["FINEINSTRUCTIONS_LLM_BACKEND"]) == "openai"


def test_env_example_lists_every_variable_the_compose_file_reads():
    listed = set()
    for line in (ROOT / ".env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, sep, _ = line.partition("=")
            assert sep, f".env.example line without '=': {line!r}"
            listed.add(name.strip())
    used = {n for n, _, _ in _compose_refs(COMPOSE)}
    assert used - listed == set(), f"missing from .env.example: {sorted(used - listed)}"
    assert listed - used == set(), f"in .env.example but unused: {sorted(listed - used)}"


def test_dockerfile_ships_the_dbt_project_and_the_production_instance():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^COPY dbt_quality ", text, re.M)
    assert re.search(rf"^COPY deploy/dagster.yaml deploy/workspace.yaml {DAGSTER_HOME}/$", text, re.M)
    assert re.search(rf"^ENV DAGSTER_HOME={DAGSTER_HOME}\b", text, re.M)
    assert "download.pytorch.org/whl/cpu" in text


# --- deploy/dagster.yaml and deploy/workspace.yaml ---------------------------------------------------

def test_instance_config_validates_with_dagsters_schema(deploy_env):
    from dagster._core.instance.config import dagster_instance_config

    config, custom_class = dagster_instance_config(str(ROOT / "deploy"))
    assert custom_class is None
    assert set(config["storage"]) == {"postgres"}
    assert set(config["storage"]["postgres"]["postgres_db"]) >= {"username", "password", "hostname",
                                                                   "db_name", "port"}
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert config["run_launcher"]["class"] == "DefaultRunLauncher"
    assert config["compute_logs"]["class"] == "S3ComputeLogManager"
    assert config["concurrency"]["pools"]["default_limit"] >= 1
    assert config["telemetry"]["enabled"] is False


def test_postgres_settings_resolve_from_the_environment(deploy_env):
    from dagster._config import process_config
    from dagster._core.storage.config import pg_config
    from dagster_postgres.utils import pg_url_from_config

    raw = yaml.safe_load((ROOT / "deploy/dagster.yaml").read_text())["storage"]["postgres"]
    result = process_config(pg_config(), raw)
    assert result.success, result.errors
    # psycopg2 is the driver dagster-postgres installs; SQLAlchemy 2.1 would pick psycopg 3 for plain postgresql://
    assert pg_url_from_config(result.value) == "postgresql+psycopg2://dagster:dummy@localhost:5432/dagster"


def test_instance_builds_with_the_queue_pools_and_s3_logs(deploy_env, tmp_path):
    """The whole instance, with SQLite standing in for Postgres: class paths and limits take effect."""
    from dagster import DagsterInstance
    from dagster._core.run_coordinator import QueuedRunCoordinator
    from dagster_aws.s3.compute_log_manager import S3ComputeLogManager

    raw = yaml.safe_load((ROOT / "deploy/dagster.yaml").read_text())
    raw["storage"] = {"sqlite": {"base_dir": str(tmp_path / "storage")}}
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(raw))
    instance = DagsterInstance.from_config(str(tmp_path))
    try:
        assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
        logs = instance.compute_log_manager
        assert isinstance(logs, S3ComputeLogManager)
        assert logs._s3_bucket == "bucket" and logs._s3_prefix == "dagster-logs"
        assert logs._s3_session.meta.endpoint_url == "http://localhost:9000"
        concurrency = instance.get_concurrency_config()
        assert concurrency.pool_config.default_pool_limit == raw["concurrency"]["pools"]["default_limit"]
        queue = concurrency.run_queue_config
        assert queue.max_concurrent_runs == raw["concurrency"]["runs"]["max_concurrent_runs"]
        assert {"key": "fineinstructions/gpu", "value": "true", "limit": 1} in queue.tag_concurrency_limits
    finally:
        instance.dispose()


def test_only_pool_in_the_code_is_gpu():
    """default_limit in deploy/dagster.yaml stands for the gpu pool only while no other pool exists."""
    pools = set()
    for path in (ROOT / "fineinstructions_dagster").rglob("*.py"):
        pools |= set(re.findall(r"\bpool\s*=\s*[\"']([^\"']+)[\"']", path.read_text()))
    assert pools == {"gpu"}


def test_workspace_points_at_the_grpc_server(deploy_env):
    from dagster._core.remote_origin import GrpcServerCodeLocationOrigin
    from dagster._core.workspace.load import location_origins_from_yaml_paths

    (origin,) = location_origins_from_yaml_paths([str(ROOT / "deploy/workspace.yaml")])
    assert isinstance(origin, GrpcServerCodeLocationOrigin)
    assert (origin.host, origin.port) == ("user_code", 4000)
    cmd = SERVICES["user_code"]["command"]
    assert origin.location_name == cmd[cmd.index("--location-name") + 1] == "fineinstructions_dagster"


# --- docs/deployment.md ------------------------------------------------------------------------------

def test_ecs_run_launcher_snippet_in_the_docs_matches_dagster_aws():
    from dagster._config import process_config
    from dagster_aws.ecs import EcsRunLauncher

    text = (ROOT / "docs/deployment.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "EcsRunLauncher" in b]
    assert len(blocks) == 1
    launcher = blocks[0]["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_aws.ecs", "EcsRunLauncher")
    result = process_config(EcsRunLauncher.config_type(), launcher["config"])
    assert result.success, result.errors
