"""Drives the cogvlm2-video plugin with MindIE-LLM's own code; run by ``test_real_mindie.py`` in a child process.

    python mindie_driver.py --tree DIR [--mindie-root DIR] --model DIR --video FILE --out FILE [--stub-npu]

``--tree`` is a MindIE-LLM ``examples/atb_models`` folder with the plugin installed in it and ``--mindie-root``
the folder holding MindIE's ``mindie_llm`` package. Everything below is MindIE's code path:
``TokenizerWrapper.tokenize`` (the service's multimodal tokenization: frames to shared memory, codes in the
vision slots), ``ModelRunner.generate_position_ids``, ``ModelRunner`` + ``load_weights``, MindIE's
``CacheManager`` (``torch.empty`` KV caches, which this driver also fills with NaN before each run), and the
offline ``generate_req`` loop with ``MultiModalRequest``; then ``request_from_multimodalinputs``, which is how
MindIE's multimodal runner calls the model's ``prepare_prefill_token``. The greedy tokens are written to
``--out`` as JSON for the test to compare with the dense reference.

``--stub-npu`` (when no NPU is present) puts ``npu_stubs/`` first on ``sys.path`` and registers the ATB
runtime stand-in; ``STUBBED`` lists what that replaces. Nothing of MindIE's own code is patched.
"""
import argparse
import json
import os
import sys

STUBS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "npu_stubs")
STUBBED = [
    "torch_npu: the NPU device (tensors on 'npu' live on the CPU), torch.npu, the SoC query, format casts, and "
    "the fused operators (the documented-semantics fake of tests/fake_npu)",
    "torch_npu._C._distributed_c10d (HCCL) and _libatb_torch (the ATB graph binding): importable, unusable",
    "libatb_speed_torch.so: torch.classes.ModelTorch handles whose clear calls do nothing",
    "acl: an empty module; lspci (on PATH): an empty PCI listing",
]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", required=True)
    parser.add_argument("--mindie-root", default="", help="omit when mindie_llm is an installed package")
    parser.add_argument("--model", required=True)
    parser.add_argument("--video", required=True, help="under <cache>/<request>/video/, as MindIE's service stores it")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--stub-npu", action="store_true")
    return parser.parse_args(argv)


def poison(cache_manager) -> None:
    for k_cache, v_cache in cache_manager.kv_cache:
        k_cache.fill_(float("nan"))
        v_cache.fill_(float("nan"))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.stub_npu:
        sys.path.insert(0, STUBS)
        os.environ["PATH"] = os.path.join(STUBS, "bin") + os.pathsep + os.environ.get("PATH", "")
        import atb_speed_stub
        import torch_npu  # noqa: F401 - registers the CPU stand-in for the NPU device

        atb_speed_stub.install()
    sys.path[:0] = [args.tree] + ([args.mindie_root] if args.mindie_root else [])
    os.chdir(args.tree)

    import numpy as np
    import torch
    from atb_llm.runner.tokenizer_wrapper import TokenizerWrapper
    from examples.server.cache import CacheConfig, CacheManager, ModelConfig
    from examples.server.generate import generate_req
    from examples.server.request import MultiModalReqParams, MultiModalRequest, request_from_multimodalinputs

    from atb_llm.runner.model_runner import ModelRunner
    from atb_llm.utils.shm_utils import release_shared_memory

    runner = ModelRunner(args.model, rank=0, world_size=1, npu_id=0, local_rank=0)
    runner.load_weights()
    model = runner.model
    result = {"model_class": type(model).__name__, "dtype": str(runner.dtype), "stubbed": STUBBED if args.stub_npu
              else [], "ops": model.ops.__name__, "device": str(runner.device), "cases": {}}

    model_config = ModelConfig(runner.num_heads, runner.num_kv_heads, runner.config.num_key_value_heads,
                               runner.k_head_size, runner.v_head_size, runner.num_layers, runner.device,
                               runner.dtype, runner.soc_info, runner.kv_quant_type, runner.fa_quant_type,
                               runner.mapping, runner.kvcache_quant_layers, 1, runner.config.model_type,
                               runner.enable_nz)
    cache_manager = CacheManager(CacheConfig(num_blocks=512, block_size=args.block_size), model_config)
    runner.postprocessor.max_new_tokens = args.steps

    # The service path: MindIE's tokenizer wrapper, positions from the ids alone, one batch of two requests.
    wrapper = TokenizerWrapper(args.model)
    cases = {
        "video": [{"video": args.video}, {"text": "What is happening in this video?"}],
        "text": [{"text": "What's deep learning?"}],
    }
    requests = []
    for index, (name, items) in enumerate(cases.items()):
        ids = wrapper.tokenize(items)
        ids = ids.numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
        if ids.ndim != 1:
            raise AssertionError(f"tokenize must return 1-D ids, got shape {ids.shape}")
        positions = np.asarray(runner.generate_position_ids(ids), dtype=np.int64)
        requests.append(MultiModalRequest(args.steps, args.block_size, index, torch.from_numpy(ids.astype(np.int64)),
                                          None, position_ids=torch.from_numpy(positions)))
        result["cases"][name] = {"ids": ids.tolist(), "positions": positions.tolist()}
    poison(cache_manager)
    generate_req(requests, runner, 2, 8192, cache_manager)
    for name, request in zip(cases, requests):
        result["cases"][name]["tokens"] = [int(t) for t in request.out_token_list]
    shm_file = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(args.video))), "shm_name.txt")
    result["shm_names"] = []
    if os.path.exists(shm_file):
        with open(shm_file, encoding="utf-8") as file:
            result["shm_names"] = file.read().split()
    release_shared_memory(shm_file)

    # The multimodal runner's path: prepare_prefill_token gives embeddings and positions for one request.
    processor = runner.tokenizer  # MindIE falls back to the tokenizer when no AutoProcessor exists
    params = MultiModalReqParams("What is happening in this video?", None, args.video, None, args.steps,
                                 args.block_size, 0)
    request = request_from_multimodalinputs(processor, runner, params)
    poison(cache_manager)
    generate_req([request], runner, 1, 8192, cache_manager)
    result["cases"]["prepare_prefill_token"] = {"tokens": [int(t) for t in request.out_token_list]}

    result["npu_operator_calls"] = dict(sys.modules["torch_npu"].CALLS) if args.stub_npu else {}
    with open(args.out, "w", encoding="utf-8") as file:
        json.dump(result, file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
