"""One decoder layer's decode step, before and after the fast-decode changes, side by side in one process.

Loads the bench_decode checkpoint's shapes (hidden 1024, 16/4 heads, ffn 3584; ``--real`` for the real model's
layer: hidden 4096, 32/8 heads, ffn 14336, random weights) and times layer 0 for one decode token per sequence
over a 576-token context at each batch size, best of n interleaved:

- before: ``F.linear`` on the checkpoint's weights and decode attention over gathered blocks;
- after: the backend's linears (``COGVLM2_LINEAR=auto``: oneDNN-prepacked where measured faster) and decode
  attention reading the paged cache in place;

plus the attention op alone. Blocks are handed out consecutively (one run per sequence, as a fresh cache hands
them out) and shuffled (every block its own run, as a long-running cache may leave them).

    .venv/bin/python -m benchmarks.bench_decode_layer [--dtype float32] [--batches 1 16] [--real]
"""
import argparse
import os
import time

import torch

from atb_llm.models.cogvlm2_llama3_video.device_ops import LINEAR_ENV, PortableOps
from atb_llm.models.cogvlm2_llama3_video.modeling_cogvlm2_llama3_video import AttentionMetadata, DecoderLayer

SHAPES = {"bench": dict(hidden_size=1024, intermediate_size=3584, num_attention_heads=16, num_multi_query_heads=4),
          "real": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_multi_query_heads=8)}


class _Group:
    def rank(self) -> int:
        return 0

    def size(self) -> int:
        return 1


class RandomWeights:
    """The ``Weights`` calls a decoder layer makes, answered with random tensors of the checkpoint's shapes."""

    def __init__(self, shapes: dict, dtype: torch.dtype):
        self.shapes, self.dtype, self.process_group = shapes, dtype, _Group()
        self.device = torch.device("cpu")

    def get_tensor(self, name: str) -> torch.Tensor:
        generator = torch.Generator().manual_seed(hash(name) % 2 ** 31)
        return (torch.randn(self.shapes[name], generator=generator) * 0.02).to(self.dtype)

    def get_multi_weights_col(self, prefixes, quantize, dim):
        return torch.cat([self.get_tensor(f"{p}.weight") for p in prefixes], dim=dim)

    def get_multi_weights_row(self, prefix, quantize):
        return self.get_tensor(f"{prefix}.weight")


class Config:
    def __init__(self, **values):
        self.__dict__.update(values, rms_norm_eps=1e-5, quantize=None)


def layer_shapes(c: Config) -> dict:
    head_dim = c.hidden_size // c.num_attention_heads
    p = "model.layers.0"
    return {f"{p}.input_layernorm.weight": (c.hidden_size,), f"{p}.post_attention_layernorm.weight": (c.hidden_size,),
            f"{p}.self_attn.language_expert_query_key_value.weight":
                (c.hidden_size + 2 * c.num_multi_query_heads * head_dim, c.hidden_size),
            f"{p}.self_attn.language_expert_dense.weight": (c.hidden_size, c.hidden_size),
            f"{p}.mlp.language_mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size),
            f"{p}.mlp.language_mlp.up_proj.weight": (c.intermediate_size, c.hidden_size),
            f"{p}.mlp.language_mlp.down_proj.weight": (c.hidden_size, c.intermediate_size)}


def best_ms(fn, repeats: int, calls: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1000


def time_batch(layers: dict, attention: dict, config: Config, dtype: torch.dtype, batch: int,
               args: argparse.Namespace, shuffled: bool) -> dict[str, tuple[float, float]]:
    """Best (layer ms, attention ms) of "before" and "after" for one decode token per sequence."""
    head_dim = config.hidden_size // config.num_attention_heads
    heads, kv_heads = config.num_attention_heads, config.num_multi_query_heads
    per_seq = -(-(args.context + 1) // args.block_size)
    num_blocks = batch * per_seq
    k_cache = torch.randn(num_blocks, args.block_size, kv_heads, head_dim).to(dtype)
    v_cache = torch.randn_like(k_cache)
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(batch)) if shuffled \
        else torch.arange(num_blocks)
    tables = order.view(batch, per_seq)
    lengths = torch.full((batch,), args.context + 1)
    slots = tables[:, args.context // args.block_size] * args.block_size + args.context % args.block_size
    meta = AttentionMetadata(is_prefill=False, slots=slots, seq_lens=lengths.tolist(), block_tables=tables,
                             context_lens=lengths)
    hidden = torch.randn(batch, config.hidden_size).to(dtype)
    angles = torch.full((batch, head_dim), float(args.context))
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    q = torch.randn(batch, heads, head_dim).to(dtype)
    times: dict[str, tuple[float, float]] = {}
    with torch.inference_mode():
        for _ in range(2):  # interleaved: the machine is shared
            for name in ("before", "after"):
                original = PortableOps.paged_decode_attention
                PortableOps.paged_decode_attention = staticmethod(attention[name])
                try:
                    layer_ms = best_ms(lambda name=name: layers[name](hidden, cos, sin, (k_cache, v_cache), meta),
                                       args.repeats)
                finally:
                    PortableOps.paged_decode_attention = original
                attn_ms = best_ms(lambda name=name: attention[name](q, k_cache, v_cache, tables, lengths,
                                                                    head_dim ** -0.5), args.repeats)
                old = times.get(name, (float("inf"), float("inf")))
                times[name] = (min(old[0], layer_ms), min(old[1], attn_ms))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=("bfloat16", "float32"))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--context", type=int, default=576)
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--real", action="store_true", help="the real model's layer shapes")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    config = Config(**SHAPES["real" if args.real else "bench"])
    shapes = layer_shapes(config)
    layers = {}
    for name, kind in (("before", "plain"), ("after", "auto")):
        os.environ[LINEAR_ENV] = kind
        layers[name] = DecoderLayer(config, RandomWeights(shapes, dtype), "model.layers.0", PortableOps)
    os.environ.pop(LINEAR_ENV)
    attention = {"before": PortableOps.paged_decode_attention_gathered,
                 "after": PortableOps.paged_decode_attention_in_place}
    print(f"torch threads {torch.get_num_threads()}, dtype {args.dtype}, context {args.context}, "
          f"{'real' if args.real else 'bench_decode'} layer shapes")
    print(f"{'batch':>5} {'blocks':>10} {'layer before ms':>16} {'layer after ms':>15} {'ratio':>6} "
          f"{'attn before ms':>15} {'attn after ms':>14} {'ratio':>6}")
    for batch in args.batches:
        for shuffled in (False, True):
            times = time_batch(layers, attention, config, dtype, batch, args, shuffled)
            (lb, ab), (la, aa) = times["before"], times["after"]
            layout = "shuffled" if shuffled else "in order"
            print(f"{batch:>5} {layout:>10} {lb:>16.2f} {la:>15.2f} {la / lb:>6.2f} {ab:>15.2f} {aa:>14.2f} "
                  f"{aa / ab:>6.2f}", flush=True)

if __name__ == "__main__":
    main()
