# One image for the webserver, the daemon and the user code (CPU build; GPU hosts install the `gpu` extra).
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends python3-doc make && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/fineinstructions
COPY pyproject.toml README.md ./
COPY fineinstructions_dagster ./fineinstructions_dagster
RUN pip install --no-cache-dir "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir -e . "torch==2.13.0"
COPY workspace.yaml ./
ENV DAGSTER_HOME=/opt/dagster_home FINEINSTRUCTIONS_ROOT=/data
RUN mkdir -p /opt/dagster_home /data
COPY deploy/dagster.local.yaml /opt/dagster_home/dagster.yaml
