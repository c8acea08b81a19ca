# One image for the user-code gRPC server, the webserver and the daemon (docker-compose.yml).
# CPU build: torch comes from PyTorch's CPU wheel index, so no CUDA packages are pulled. On GPU hosts
# the compose `vllm` service runs the models; to run vLLM inside this image instead, install the
# `gpu` extra (`pip install -e ".[gpu]"`) on a CUDA base image (not built or tested here).
FROM python:3.11-slim

# python3-doc: the offline sample (`fineinstructions sample`); make: the Makefile targets.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-doc make \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/fineinstructions
COPY pyproject.toml README.md constraints.txt ./
COPY fineinstructions_dagster ./fineinstructions_dagster
# The dbt project behind the data-quality asset checks.
COPY dbt_quality ./dbt_quality
# torch first from the CPU index; the second install then finds it already satisfied. The versions are the lock's
# (constraints.txt: what the suite passed with).
RUN pip install --no-cache-dir "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir -c constraints.txt -e . "torch==2.13.0" \
 && DBT_SEND_ANONYMOUS_USAGE_STATS=false dbt parse --quiet --project-dir dbt_quality --profiles-dir dbt_quality

# Dagster instance (Postgres, queued runs, gpu pool, S3 compute logs) and the workspace that
# loads the code location from the gRPC server; every secret in them is an env reference.
ENV DAGSTER_HOME=/opt/dagster_home FINEINSTRUCTIONS_ROOT=/data
RUN mkdir -p /opt/dagster_home /data
COPY deploy/dagster.yaml deploy/workspace.yaml /opt/dagster_home/
