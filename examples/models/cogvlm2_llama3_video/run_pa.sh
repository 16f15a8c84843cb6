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

# World size = number of visible devices (comma-separated ids), unless TP_WORLD_SIZE is set.
IFS=',' read -r -a devices <<< "${ASCEND_RT_VISIBLE_DEVICES}"
TP_WORLD_SIZE=${TP_WORLD_SIZE:-${#devices[@]}}

PYTHON=${PYTHON:-python}
if [ -x .venv/bin/python ] && [ "${PYTHON}" = python ]; then
    PYTHON=.venv/bin/python
fi

if [ "${TP_WORLD_SIZE}" -gt 1 ]; then
    exec "${PYTHON}" -m torch.distributed.run --nproc_per_node "${TP_WORLD_SIZE}" --master_port "${MASTER_PORT}" \
        -m examples.models.cogvlm2_llama3_video.run_pa "$@"
fi
exec "${PYTHON}" -m examples.models.cogvlm2_llama3_video.run_pa "$@"
