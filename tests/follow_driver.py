"""Test driver for leader/follower tensor parallelism: rank 0 runs the engine, the other ranks follow.

    python -m torch.distributed.run --nproc_per_node 2 -m tests.follow_driver MODEL_DIR VIDEO OUT.json
"""
import json
import sys

import torch

from atb_llm.runner.offline_runner import MultimodalInput, MultimodalPARunner
from atb_llm.runner.sampler import SamplingParams


def main(model_dir: str, video: str, out_path: str) -> int:
    torch.set_num_threads(1)
    runner = MultimodalPARunner(model_path=model_dir, dtype="float32", device="cpu", max_input_length=2048,
                                max_output_length=8, max_batch_size=3, block_size=16)
    if runner.rank != 0:
        runner.model.follow(runner.make_cache_manager().kv_cache)
        return 0
    runner.model.leads_followers = runner.world_size > 1
    sampling = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    # The third repeats the first: it is prefilled once and its KV blocks are copied (on every rank).
    items = [MultimodalInput("What is in the video?", video), MultimodalInput("Text only question"),
             MultimodalInput("What is in the video?", video)]
    try:
        requests = runner.infer_multimodal(items, sampling)
    finally:
        runner.model.release_followers()
    with open(out_path, "w", encoding="utf-8") as file:
        json.dump({"tokens": [r.output_ids for r in requests], "errors": [r.error for r in requests],
                   "world_size": runner.world_size, "all_free": runner.cache_manager.block_manager.all_free}, file)
    return 0


if __name__ == "__main__":
    code = main(*sys.argv[1:4])
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.exit(code)
