"""Decode speed of our paged engine against transformers' ``generate`` (and vLLM with the plugin, when this
interpreter has it) on the same weights, side by side in one process.

Builds (once, into a temp dir) a text-only-sized checkpoint in the real layout (hidden 1024, 8 layers,
16/4 heads, ffn 3584, vocab 128256: a 372 M-parameter Llama), loads the same tensors into
``transformers.LlamaForCausalLM``, and times, greedy, for each batch size (default 1, 8, 16), best of n
interleaved runs:

- ours: the backend's linears (on CPU the kernel measured fastest at load: oneDNN-prepacked, fp16-packed for
  FBGEMM, ...) and in-place decode attention;
- ours before: ``F.linear`` on the checkpoint's weights and decode attention over gathered blocks (the engine
  before the fast-decode work; ``--no-before`` skips it);
- transformers (sdpa);
- vLLM with vllm_cogvlm2 (only when ``vllm`` imports, i.e. run in ``.venv-vllm``; ``--no-vllm`` skips it), in a
  worker process of its own, loaded once and timed in turn with the others in every round.

Prints the streaming floor (the time to read a step's weight bytes once, measured as the best multi-threaded
reduction over a buffer of that size), ms per decode step, tokens/s and the ratios (ours / other; below 1 is
faster), and writes a plot of
tokens/s against batch size (``--plot``, matplotlib from requirements/benchmark.txt). "same tokens" counts
sequences whose greedy tokens agree with transformers'; in bf16, random weights give near-tied logits where
rounding order decides the argmax, so use float32 (the default) to check equality.

    .venv/bin/python -m benchmarks.bench_decode [--dtype float32] [--prompt 256] [--steps 32] [--plot FILE]
"""
import argparse
import contextlib
import importlib.util
import os
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

from atb_llm.demo.make_demo import make_demo_checkpoint
from atb_llm.models.cogvlm2_llama3_video.device_ops import LINEAR_ENV, PortableOps
from atb_llm.runner.engine import Request
from atb_llm.runner.offline_runner import PARunner
from atb_llm.runner.sampler import SamplingParams

PEER = {"hidden_size": 1024, "intermediate_size": 3584, "num_attention_heads": 16, "num_multi_query_heads": 4,
        "num_hidden_layers": 8, "max_position_embeddings": 4096,
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "num_hidden_layers": 1}}


def hf_llama(runner: PARunner, dtype: torch.dtype) -> LlamaForCausalLM:
    """The same weights as a transformers Llama (the video model's LM is a Llama-3 decoder)."""
    c = runner.model.config
    config = LlamaConfig(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_multi_query_heads,
                         num_hidden_layers=c.num_hidden_layers, vocab_size=c.vocab_size, rms_norm_eps=c.rms_norm_eps,
                         rope_theta=500000.0, max_position_embeddings=c.max_position_embeddings,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(dtype).eval()
    ours = runner.model.model
    hd = c.hidden_size // c.num_attention_heads
    kv = c.num_multi_query_heads * hd
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(ours.model.embed_tokens.weight)
        model.model.norm.weight.copy_(ours.model.norm.weight)
        model.lm_head.weight.copy_(ours.lm_head.weight)
        for mine, theirs in zip(ours.model.layers, model.model.layers):
            q, k, v = mine.self_attn.query_key_value.weight.split([c.hidden_size, kv, kv])
            theirs.self_attn.q_proj.weight.copy_(q)
            theirs.self_attn.k_proj.weight.copy_(k)
            theirs.self_attn.v_proj.weight.copy_(v)
            theirs.self_attn.o_proj.weight.copy_(mine.self_attn.dense.weight)
            gate, up = mine.mlp.gate_up_proj.weight.chunk(2)
            theirs.mlp.gate_proj.weight.copy_(gate)
            theirs.mlp.up_proj.weight.copy_(up)
            theirs.mlp.down_proj.weight.copy_(mine.mlp.down_proj.weight)
            theirs.input_layernorm.weight.copy_(mine.input_layernorm.weight)
            theirs.post_attention_layernorm.weight.copy_(mine.post_attention_layernorm.weight)
    return model


def time_ours(runner: PARunner, prompts, steps: int):
    sampling = SamplingParams(max_new_tokens=steps, temperature=0.0, ignore_eos=True)
    requests = [Request(prompt_ids=list(p), sampling=sampling) for p in prompts]
    engine = runner.make_engine()
    for request in requests:
        engine.add_request(request)
    start = time.perf_counter()
    engine.step()  # the prefill of the whole batch
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    decode = time.perf_counter() - start
    return prefill, decode / (steps - 1), [r.output_ids for r in requests]


class _StepClock(LogitsProcessor):
    """Stamps the time each generated token's logits are ready (after its forward)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


def time_hf(model, prompts, steps: int):
    """One ``generate``: prefill = until the first logits, decode = between the first and the last logits."""
    ids = torch.tensor(prompts)
    clock = _StepClock()
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0,
                             logits_processor=LogitsProcessorList([clock]))
    return clock.times[0] - start, (clock.times[-1] - clock.times[0]) / (steps - 1), out[:, ids.shape[1]:].tolist()


def decode_weight_bytes(model: LlamaForCausalLM) -> int:
    """Bytes of weights a decode step must read: every linear of the decoder and lm_head (the embedding is read a
    row per token)."""
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters() if "embed_tokens" not in name)


def streaming_floor(nbytes: int, rounds: int = 5) -> tuple[float, float]:
    """(seconds, GB/s) to read ``nbytes`` of memory once, the fastest way measured here: best of ``rounds`` of a
    vectorised, multi-threaded reduction (``sum``; ``amax`` too) over a buffer of that size, larger than any
    cache. A decode step cannot read its weights faster, whatever the kernel."""
    buffer = torch.ones(nbytes // 4, dtype=torch.float32)
    best = float("inf")
    with torch.inference_mode():
        for reduce in (torch.sum, torch.amax) * rounds:
            start = time.perf_counter()
            reduce(buffer)
            best = min(best, time.perf_counter() - start)
    return best, nbytes / best / 1e9


@contextlib.contextmanager
def gathered_decode_attention():
    """Decode attention over gathered blocks (the path before in-place reads), for the "before" timing."""
    original = PortableOps.paged_decode_attention
    PortableOps.paged_decode_attention = staticmethod(PortableOps.paged_decode_attention_gathered)
    try:
        yield
    finally:
        PortableOps.paged_decode_attention = original


def make_runner(model_dir: str, args: argparse.Namespace, linear: str, quantize: str | None = None) -> PARunner:
    saved = os.environ.get(LINEAR_ENV)
    os.environ[LINEAR_ENV] = linear
    try:
        return PARunner(model_path=model_dir, dtype=args.dtype, device="cpu", max_input_length=args.prompt,
                        max_output_length=args.steps, max_batch_size=max(args.batches), block_size=128,
                        quantize=quantize)
    finally:
        if saved is None:
            os.environ.pop(LINEAR_ENV)
        else:
            os.environ[LINEAR_ENV] = saved


def plot(results: dict, batches: list[int], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for name, rows in results.items():
        axis.plot(batches, [b / rows[b][1] for b in batches], marker="o", label=name)
    axis.set_xlabel("batch size (sequences decoding together)")
    axis.set_ylabel("decode tokens/s")
    axis.set_xticks(batches)
    axis.set_title(title, fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"plot written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=("bfloat16", "float32"))
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-before", dest="before", action="store_false", help="skip the pre-fast-decode path")
    parser.add_argument("--no-vllm", dest="vllm", action="store_false", help="skip vLLM even where it imports")
    parser.add_argument("--w8a16", action="store_true", help="also time ours with --quantize w8a16")
    parser.add_argument("--plot", default="bench_decode.png", help="PNG of tokens/s against batch ('' = none)")
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    prompts = {b: torch.randint(0, 120000, (b, args.prompt), generator=torch.Generator().manual_seed(b)).tolist()
               for b in args.batches}
    results: dict[str, dict] = {"ours": {}, "ours before": {}, "transformers": {}}
    if not args.before:
        del results["ours before"]
    if args.w8a16:
        results["ours w8a16"] = {}
    with tempfile.TemporaryDirectory() as folder:
        model_dir = make_demo_checkpoint(os.path.join(folder, "peer"), shards=1, overrides=PEER)
        runner = make_runner(model_dir, args, "auto")
        before = make_runner(model_dir, args, "plain") if args.before else None
        quantized = make_runner(model_dir, args, "auto", "w8a16") if args.w8a16 else None
        hf = hf_llama(runner, dtype)
        vllm = None
        if args.vllm and importlib.util.find_spec("vllm") is not None:
            from benchmarks.bench_vllm_plugin import VllmPeer  # that module imports this one

            vllm = VllmPeer(model_dir, args)
            results["vLLM"] = {}
        weight_bytes = decode_weight_bytes(hf)
        floor, bandwidth = streaming_floor(weight_bytes)
        for batch in args.batches:
            for _ in range(args.repeats):  # interleaved, best of n: the machine is shared and noisy
                runs = {"ours": time_ours(runner, prompts[batch], args.steps)}
                if before is not None:
                    with gathered_decode_attention():
                        runs["ours before"] = time_ours(before, prompts[batch], args.steps)
                if quantized is not None:
                    runs["ours w8a16"] = time_ours(quantized, prompts[batch], args.steps)
                runs["transformers"] = time_hf(hf, prompts[batch], args.steps)
                if vllm is not None:
                    runs["vLLM"] = vllm(prompts[batch], args.steps)
                for name, run in runs.items():
                    if batch not in results[name] or run[1] < results[name][batch][1]:
                        results[name][batch] = run
        del runner, before, quantized, hf
        if vllm is not None:
            vllm.close()
    print(f"torch threads {torch.get_num_threads()}, dtype {args.dtype}, prompt {args.prompt}, steps {args.steps}, "
          f"best of {args.repeats}")
    print(f"streaming floor: {weight_bytes / 1e9:.2f} GB of {args.dtype} weights per step at {bandwidth:.1f} GB/s "
          f"(best reduction over a buffer that size) = {floor * 1000:.1f} ms/step; ours at batch 1 "
          f"{results['ours'][args.batches[0]][1] / floor:.2f}x the floor (batch {args.batches[0]})")
    others = [name for name in results if name != "ours"]
    header = f"{'batch':>5} " + " ".join(f"{name + ' ms/step':>20}" for name in results)
    header += " " + " ".join(f"{'ours/' + name:>18}" for name in others)
    header += f" {'ours tok/s':>10} {'same tokens':>11}"
    print(header)
    for batch in args.batches:
        ours = results["ours"][batch]
        line = f"{batch:>5} " + " ".join(f"{results[name][batch][1] * 1000:>20.1f}" for name in results)
        line += " " + " ".join(f"{ours[1] / results[name][batch][1]:>18.2f}" for name in others)
        same = sum(a == b for a, b in zip(ours[2], results["transformers"][batch][2]))
        line += f" {batch / ours[1]:>10.1f} {same:>8}/{batch}"
        print(line)
    if args.plot:
        plot(results, args.batches, args.plot, f"decode, 372M Llama, {args.dtype}, {torch.get_num_threads()} threads, "
                                               f"prompt {args.prompt}")


if __name__ == "__main__":
    main()
