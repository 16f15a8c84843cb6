"""Test driver: runs greedy generation cases on one process or under torchrun, recording tokens and logits.

    python -m torch.distributed.run --nproc_per_node 2 -m tests.tp_driver SPEC.json OUT_DIR

SPEC is a JSON list of cases ``{"name", "model_dir", "steps", "items": [{"text", "video"}, ...]}``; every
case runs its items as one batch through the multimodal runner (fp32, CPU). Each rank writes
``OUT_DIR/rank{r}.pt``: ``{case: {"tokens": [[ids]...], "logits": [[steps, vocab]...], "texts": [...]}}``.
"""
import json
import os
import sys

import torch

from atb_llm.runner.offline_runner import MultimodalInput, MultimodalPARunner
from atb_llm.runner.sampler import SamplingParams


def run_case(case: dict) -> dict:
    steps = case["steps"]
    items = [MultimodalInput(item["text"], item.get("video")) for item in case["items"]]
    runner = MultimodalPARunner(model_path=case["model_dir"], dtype="float32", device="cpu", max_input_length=2048,
                                max_output_length=steps, max_batch_size=len(items), block_size=16)
    sampling = SamplingParams(max_new_tokens=steps, temperature=0.0, ignore_eos=True)
    requests = [runner.prepare_request(item, sampling) for item in items]
    for request in requests:
        if request.error:
            raise RuntimeError(request.error)
    engine = runner.make_engine()
    logits: dict[str, list[torch.Tensor]] = {}
    engine.on_logits = lambda ids, rows: [logits.setdefault(i, []).append(r.clone()) for i, r in zip(ids, rows)]
    engine.generate(requests)
    if not engine.blocks.all_free:
        raise RuntimeError("KV blocks leaked")
    return {"tokens": [list(r.output_ids) for r in requests],
            "logits": [torch.stack(logits[r.request_id]) for r in requests],
            "texts": [r.text for r in requests],
            "num_kv_heads": runner.model.num_kv_heads,
            "kv_cache_shape": list(engine.cache.kv_cache[0][0].shape)}


def run_cases(cases: list[dict]) -> dict:
    return {case["name"]: run_case(case) for case in cases}


def main(argv: list[str]) -> int:
    spec_path, out_dir = argv
    with open(spec_path, encoding="utf-8") as file:
        cases = json.load(file)
    torch.set_num_threads(1)
    results = run_cases(cases)
    rank = int(os.environ.get("RANK", "0"))
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
