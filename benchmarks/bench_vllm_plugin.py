"""Our paged engine against vLLM with the plugin (vllm_cogvlm2), on the same checkpoint, in one run.

Builds (once, into a temp dir) a checkpoint in the real layout: the 372 M-parameter LM of
benchmarks/bench_decode.py (hidden 1024, 8 layers, 16/4 heads, ffn 3584, vocab 128256) with a 2-layer vision
tower of the real widths (1792 wide, ffn 15360, 16 heads), and a 26 s video (24 frames by the chat rule).
Times, greedy, for each engine:

- decode ms/step at batch 1 and 8 over 512-token prompts, each engine from the end of its prefill to its last
  token (ours by its step clock, vLLM by its engine core's per-request token stamps), over N - 1 steps;
- time to first token of a 24-frame video question (decode of the file, vision tower, prefill of ~1.6 k tokens).

Ours runs with torch's threads (2 here); vLLM in a worker process of its own (``VllmPeer``, which bench_decode
uses too: its engine in that process, VLLM_ENABLE_V1_MULTIPROCESSING=0, given the same cores,
VLLM_CPU_OMP_THREADS_BIND=0-N with no core reserved), loaded once, in eager mode (--compile lets vLLM use
torch.compile; on 2 cores that adds minutes of start-up). Every measurement is interleaved: each round times
ours, then vLLM, on the same input, so both see the same moments of a noisy machine; best of the rounds. Prefix
caching and vLLM's multimodal processor cache are off and our vision-feature cache is bypassed, so every TTFT
run decodes and encodes the video again. Prints both side by side with the ratio ours / vLLM (below 1: ours is
faster). Run in the vLLM venv:

    bash scripts/setup.sh vllm && .venv-vllm/bin/python -m benchmarks.bench_vllm_plugin [--dtype float32]
"""
import argparse
import multiprocessing
import os
import tempfile
import time

import torch

from atb_llm.demo.make_demo import make_demo_checkpoint
from atb_llm.demo.synthetic_video import write_synthetic_video
from atb_llm.runner.engine import Request
from atb_llm.runner.offline_runner import PARunner
from atb_llm.runner.sampler import SamplingParams as OurSampling
from benchmarks.bench_decode import PEER, time_ours

CHECKPOINT = dict(PEER, vision_config={"hidden_size": 1792, "intermediate_size": 15360, "num_heads": 16,
                                       "num_hidden_layers": 2})
QUESTION = "What is the general content of this video?"


def our_ttft(runner: PARunner, video: str) -> tuple[float, int]:
    """Decode the video, run the vision tower and the prefill; the first token's time, and the prompt length."""
    engine = runner.make_engine()
    start = time.perf_counter()
    ids, pixels, _ = runner.model.input_builder.prepare([{"role": "user", "content": [{"video": video},
                                                                                      {"text": QUESTION}]}])
    request = Request(prompt_ids=ids, sampling=OurSampling(max_new_tokens=1, temperature=0.0, ignore_eos=True),
                      pixel_values=pixels)  # no video_key: the vision-feature cache is not used
    engine.generate([request])
    return time.perf_counter() - start, len(ids)


def use_vllm_in_this_process(threads: int) -> None:
    """vLLM's engine in the calling process (no engine-core subprocess), its OpenMP threads bound to the first
    ``threads`` cores with none reserved for its scheduler (ours uses them all), 4 GiB of KV cache."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")


def vllm_engine(model_dir: str, args, media_dir: str):
    from vllm import LLM

    # Stats on: each output then carries the engine core's first- and last-token stamps (``vllm_decode``).
    return LLM(model_dir, dtype=args.dtype, max_model_len=4096, max_num_seqs=max(args.batches), seed=0,
               enforce_eager=not args.compile, enable_prefix_caching=False, mm_processor_cache_gb=0,
               allowed_local_media_path=media_dir, disable_log_stats=False)


def vllm_decode(llm, prompts, steps: int):
    """(seconds to the last first token, decode seconds per step, tokens) of one greedy batch, timed by the engine
    core's own stamps: decode runs from the step that gave the batch's last first token (a batch whose prompts
    exceed one step's token budget is prefilled over several) to its last token, as ours is timed from the end of
    its prefill. (A difference of two ``generate`` calls, one of 1 token and one of ``steps``, would carry the
    prefill's jitter, divided by the steps, into the decode time.)"""
    from vllm import SamplingParams, TokensPrompt

    inputs = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True, detokenize=False)
    start = time.monotonic()  # the engine core stamps with time.monotonic() too
    outputs = llm.generate(inputs, params, use_tqdm=False)
    stats = [o.metrics for o in outputs]
    if any(s is None or not s.first_token_ts or not s.last_token_ts for s in stats):
        raise RuntimeError("vLLM returned no per-request token stamps (RequestOutput.metrics); log stats must be on")
    first = max(s.first_token_ts for s in stats)
    last = max(s.last_token_ts for s in stats)
    return first - start, (last - first) / (steps - 1), [list(o.outputs[0].token_ids) for o in outputs]


def vllm_ttft(llm, video: str) -> tuple[float, int]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False)
    start = time.perf_counter()
    [output] = llm.generate([{"prompt": f"Question: {QUESTION} Answer:", "multi_modal_data": {"video": video}}],
                            params, use_tqdm=False)
    return time.perf_counter() - start, len(output.prompt_token_ids)


def _vllm_worker(model_dir: str, dtype: str, max_batch: int, threads: int, compile_: bool, connection) -> None:
    """vLLM with the plugin in a process of its own, running what it is asked (``("decode", prompts, steps)`` or
    ``("ttft", video)``; None ends it). Its own process: vLLM binds the OpenMP threads of the process it runs in and
    then refuses ``torch.set_num_threads``, which would change how ours runs beside it."""
    use_vllm_in_this_process(threads)

    llm = vllm_engine(model_dir, argparse.Namespace(dtype=dtype, batches=[max_batch], compile=compile_),
                      os.path.dirname(model_dir))
    tasks = {"decode": vllm_decode, "ttft": vllm_ttft}
    connection.send("ready")
    while (message := connection.recv()) is not None:
        task, *task_args = message
        connection.send(tasks[task](llm, *task_args))


class VllmPeer:
    """The vLLM worker process, loaded once and then timed in turn with ours, so that both see the same moments of
    a noisy machine (run from .venv-vllm). Media it is given must lie beside the checkpoint's folder."""

    def __init__(self, model_dir: str, args: argparse.Namespace):
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_vllm_worker, daemon=True, args=(
            model_dir, args.dtype, max(args.batches), torch.get_num_threads(), getattr(args, "compile", False),
            child))
        self.process.start()
        if self.connection.recv() != "ready":
            raise RuntimeError("the vLLM worker did not start")

    def __call__(self, prompts, steps: int):
        """(first-token seconds, decode seconds per step, tokens) of a greedy batch."""
        self.connection.send(("decode", prompts, steps))
        return self.connection.recv()

    def ttft(self, video: str) -> tuple[float, int]:
        """(seconds to the first token, prompt length) of the video question."""
        self.connection.send(("ttft", video))
        return self.connection.recv()

    def close(self) -> None:
        self.connection.send(None)
        self.process.join(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=("bfloat16", "float32"),
                        help="float32 by default: without native bf16 (AVX2 CPUs) PyTorch's bf16 GEMMs of the "
                             "vision tower run ~8x slower than fp32, so a bf16 TTFT here measures that")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=2, help="decode: best of n (a shared machine is noisy)")
    parser.add_argument("--ttft-repeats", type=int, default=1, help="TTFT: best of n (each run is long)")
    parser.add_argument("--compile", action="store_true", help="let vLLM use torch.compile (default: eager)")
    args = parser.parse_args()
    threads = torch.get_num_threads()

    with tempfile.TemporaryDirectory() as folder:
        model_dir = make_demo_checkpoint(os.path.join(folder, "model"), shards=1, overrides=CHECKPOINT)
        video = write_synthetic_video(os.path.join(folder, "video.mp4"), seconds=26, fps=4, size=(320, 240))
        prompts = {b: torch.randint(0, 120000, (b, args.prompt), generator=torch.Generator().manual_seed(b)).tolist()
                   for b in args.batches}

        runner = PARunner(model_path=model_dir, dtype=args.dtype, device="cpu", max_input_length=2048,
                          max_output_length=args.steps, max_batch_size=max(args.batches), block_size=128)
        vllm_peer = VllmPeer(model_dir, args)
        ours, theirs = {}, {}
        try:
            for batch in args.batches:
                for _ in range(args.repeats):
                    runs = ((ours, time_ours(runner, prompts[batch], args.steps)),
                            (theirs, vllm_peer(prompts[batch], args.steps)))
                    for results, run in runs:
                        if batch not in results or run[1] < results[batch][1]:
                            results[batch] = run
            ttft_runs = [(our_ttft(runner, video), vllm_peer.ttft(video)) for _ in range(args.ttft_repeats)]
            ours_ttft = min(mine for mine, _ in ttft_runs)
            theirs_ttft = min(other for _, other in ttft_runs)
        finally:
            vllm_peer.close()
        del runner

    import vllm

    print(f"vLLM {vllm.__version__} + vllm_cogvlm2 ({'torch.compile' if args.compile else 'eager'}) vs ours; "
          f"torch threads {threads}, dtype {args.dtype}, prompt {args.prompt}, steps {args.steps}")
    print(f"{'metric':<28} {'ours':>10} {'vLLM':>10} {'ours/vLLM':>10} {'same tokens':>12}")
    for batch in args.batches:
        mine, other = ours[batch], theirs[batch]
        same = sum(a == b for a, b in zip(mine[2], other[2]))
        print(f"{f'decode ms/step, batch {batch}':<28} {mine[1] * 1e3:>10.1f} {other[1] * 1e3:>10.1f} "
              f"{mine[1] / other[1]:>10.2f} {same:>9}/{batch}")
    print(f"{f'TTFT s, 24 frames ({ours_ttft[1]} tok)':<28} {ours_ttft[0]:>10.2f} {theirs_ttft[0]:>10.2f} "
          f"{ours_ttft[0] / theirs_ttft[0]:>10.2f}")
    if ours_ttft[1] != theirs_ttft[1]:
        print(f"warning: prompt lengths differ (ours {ours_ttft[1]}, vLLM {theirs_ttft[1]})")


if __name__ == "__main__":
    main()
