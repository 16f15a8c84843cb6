#!/usr/bin/env bash
# Launcher of cogvlm2-video-llama3-chat, as the seed README: run from ${llm_path}, one process per
# visible device (ASCEND_RT_VISIBLE_DEVICES), through torchrun.
#   bash examples/models/cogvlm2_llama3_video/run_pa.sh [--model_path DIR] [--video_path V] [runner flags...]
# Environment the seed README documents (accepted; the Ascend ones matter only on NPUs):
#   LCCL_DETERMINISTIC HCCL_DETERMINISTIC ATB_MATMUL_SHUFFLE_K_ENABLE ATB_LLM_LCOC_ENABLE
#   ATB_LOG_TO_STDOUT ATB_LOG_LEVEL ASDOPS_LOG_LEVEL ASDOPS_LOG_TO_STDOUT ASCEND_SLOG_PRINT_TO_STDOUT
#   ASCEND_GLOBAL_LOG_LEVEL INF_NAN_MODE_ENABLE INT8_FORMAT_NZ_ENABLE ASCEND_RT_VISIBLE_DEVICES
set -euo pipefail

export ASCEND_RT_VISIBLE_DEVICES=${ASCEND_RT_VISIBLE_DEVICES:-0}
export MASTER_PORT=${MASTER_PORT:-20030}
export INF_NAN_MODE_ENABLE=${INF_NAN_MODE_ENABLE:-0}
export INT8_FORMAT_NZ_ENABLE=${INT8_FORMAT_NZ_ENABLE:-1}
export ATB_LLM_LCOC_ENABLE=${ATB_LLM_LCOC_ENABLE:-0}

# World size = number of visible devices (comma-separated ids), unless TP_WORLD_SIZE is set or the
# command line says --nproc N (or --tp N); those two flags are consumed here.
IFS=',' read -r -a devices <<< "${ASCEND_RT_VISIBLE_DEVICES}"
TP_WORLD_SIZE=${TP_WORLD_SIZE:-${#devices[@]}}
args=()
while [ "$#" -gt 0 ]; do
    case "$1" in
        --nproc|--tp)
            [ "$#" -ge 2 ] || { echo "$1 needs a value" >&2; exit 2; }
            TP_WORLD_SIZE="$2"; shift 2 ;;
        --nproc=*|--tp=*) TP_WORLD_SIZE="${1#*=}"; shift ;;
        *) args+=("$1"); shift ;;
    esac
done
if ! [[ "${TP_WORLD_SIZE}" =~ ^[1-9][0-9]*$ ]]; then
    echo "the world size must be a positive integer, got '${TP_WORLD_SIZE}'" >&2
    exit 2
fi
set -- ${args[@]+"${args[@]}"}
# RUN_PA_DRY_RUN=1 prints the command instead of running it.
launch() {
    if [ "${RUN_PA_DRY_RUN:-0}" = 1 ]; then
        printf '%q ' "$@"; echo
        exit 0
    fi
    exec "$@"
}

PYTHON=${PYTHON:-python}
if [ -x .venv/bin/python ] && [ "${PYTHON}" = python ]; then
    PYTHON=.venv/bin/python
fi

if [ "${TP_WORLD_SIZE}" -gt 1 ]; then
    launch "${PYTHON}" -m torch.distributed.run --nproc_per_node "${TP_WORLD_SIZE}" --master_port "${MASTER_PORT}" \
        -m examples.models.cogvlm2_llama3_video.run_pa "$@"
fi
launch "${PYTHON}" -m examples.models.cogvlm2_llama3_video.run_pa "$@"
