#!/usr/bin/env bash
# Installs cogvlm2-video-llama3-chat into an existing MindIE-LLM model tree (the directory that holds
# atb_llm/ and examples/, e.g. ${ATB_SPEED_HOME_PATH}/../atb-models or MindIE-LLM's examples/atb_models):
#
#   bash examples/models/cogvlm2_llama3_video/install_into_mindie.sh ATB_MODELS_DIR [--force]
#
# Copies
#   atb_llm/models/cogvlm2_llama3_video/                      (the plugin: get_model finds it by model_type)
#   examples/models/cogvlm2_llama3_video/                     (run_pa.sh and the model's scripts)
#   requirements/models/requirements_cogvlm2_video_llama3_chat.txt
#   tests/modeltest/modeltest/config/model/cogvlm2_llama3_video.yaml   (only if the tree has that folder)
#   atb_llm/runner/{engine,cache,sampler,detokenizer,offline_runner}.py  (the continuous-batching runtime the
#       model's runner drives; new files beside MindIE's model_runner.py, which it uses as is)
# and refuses to overwrite an existing installation unless --force is given. Nothing else in the tree
# is touched: the framework needs no change for this model.
set -euo pipefail

usage() {
    echo "usage: $0 ATB_MODELS_DIR [--force]" >&2
    exit 2
}

target=""
force=0
for arg in "$@"; do
    case "${arg}" in
        --force) force=1 ;;
        -h|--help) usage ;;
        -*) echo "unknown option ${arg}" >&2; usage ;;
        *) [ -z "${target}" ] || usage; target="${arg}" ;;
    esac
done
[ -n "${target}" ] || usage

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source_root="$(cd "${here}/../../.." && pwd)"
model="cogvlm2_llama3_video"
requirements="requirements/models/requirements_cogvlm2_video_llama3_chat.txt"

if [ ! -d "${target}" ]; then
    echo "error: ${target} does not exist" >&2
    exit 1
fi
target="$(cd "${target}" && pwd)"
if [ ! -d "${target}/atb_llm/models" ] || [ ! -d "${target}/examples" ]; then
    echo "error: ${target} does not look like a MindIE-LLM model tree (it needs atb_llm/models/ and examples/)" >&2
    exit 1
fi
if [ "${target}" = "${source_root}" ]; then
    echo "error: ${target} is this repository itself" >&2
    exit 1
fi

sources=("atb_llm/models/${model}" "examples/models/${model}" "${requirements}")
for module in engine cache sampler detokenizer offline_runner; do
    sources+=("atb_llm/runner/${module}.py")
done
# The regression suite's model config, when the tree has MindIE's modeltest.
modeltest_config="tests/modeltest/modeltest/config/model/${model}.yaml"
if [ -d "${target}/$(dirname "${modeltest_config}")" ]; then
    sources+=("${modeltest_config}")
fi
for path in "${sources[@]}"; do
    if [ ! -e "${source_root}/${path}" ]; then
        echo "error: ${source_root}/${path} is missing from this checkout" >&2
        exit 1
    fi
done

existing=()
for path in "${sources[@]}"; do
    if [ -e "${target}/${path}" ] || [ -L "${target}/${path}" ]; then
        existing+=("${target}/${path}")
    fi
done
if [ "${#existing[@]}" -gt 0 ] && [ "${force}" -ne 1 ]; then
    echo "error: already installed (use --force to overwrite):" >&2
    printf '  %s\n' "${existing[@]}" >&2
    exit 1
fi

for path in "${sources[@]}"; do
    destination="${target}/${path}"
    mkdir -p "$(dirname "${destination}")"
    rm -rf "${destination}"
    cp -R "${source_root}/${path}" "${destination}"
    if [ -d "${destination}" ]; then
        find "${destination}" -name "__pycache__" -type d -prune -exec rm -rf {} +
        find "${destination}" -name "*.pyc" -type f -delete
    fi
    echo "installed ${destination}"
done
chmod -R go-w "${target}/atb_llm/models/${model}" "${target}/examples/models/${model}"

cat <<EOF
Next steps (in the MindIE-LLM tree ${target}):
  1. add "model_type": "${model}" and "torch_dtype": "bfloat16" to the checkpoint's config.json;
  2. pip install -r ${requirements}   (it leaves torch / torch_npu alone);
  3. bash examples/models/${model}/run_pa.sh --model_path /path/to/cogvlm2-video-llama3-chat ...
EOF
