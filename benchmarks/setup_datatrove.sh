#!/usr/bin/env bash
# datatrove in its own virtualenv (its processing extra + spaCy for its English word tokenizer), so that
# its pins never touch the project's environment. Idempotent.
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv-datatrove
want="datatrove==0.10.1 spacy"
if [ -f "$VENV/.stamp" ] && [ "$(cat "$VENV/.stamp")" = "$want" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "datatrove[processing,io]==0.10.1" spacy 2>&1 \
  | { grep -v "is ignored: it is neither a file nor a directory" || true; }
echo "$want" > "$VENV/.stamp"
