"""The CPU linear kernels ``cpu_linear_kind`` chooses between, on a model's decode linears, side by side in one run.

Random weights of the bench_decode model's linears (8 layers of fused q|k|v 1536x1024, o 1024x1024, fused gate|up
7168x1024, down 1024x3584, and lm_head 128256x1024; ``--real`` for 2 of the real model's 32 layers, hidden 4096 and
ffn 14336, and its lm_head 128256x4096: 1.9 GB in bf16, ~8 GB with every kernel's copy), in the model's dtype (bf16
by default). For each row count
(the decode batch size) every kernel runs all the layers' linears, then lm_head, in turn, interleaved, best of n;
the weights together are far larger than the caches, so each call reads its weight from memory, as in a decode step:

- plain: ``F.linear`` on the weight as loaded (bf16: torch's gemv at 1 row, its bf16 GEMM above);
- packed: the oneDNN-prepacked weight (``PackedLinear``; fp32 for bf16 on a CPU without native bf16);
- fp16: FBGEMM's fp16 GEMM over the weight packed in fp16 (``Fp16Linear``; bf16 / fp16 weights, x86 builds).

Prints ms per kernel and the GB/s of the weights' bytes as stored, and which kernel ``cpu_linear_kind`` picks for
each shape at 1 row and the largest row count.

    .venv/bin/python -m benchmarks.bench_linears [--dtype bfloat16] [--rows 1 2 4 8 16] [--real]
"""
import argparse
import time

import torch

from atb_llm.models.cogvlm2_llama3_video.device_ops import (
    DenseLinear,
    Fp16Linear,
    PackedLinear,
    cpu_linear_kind,
    decode_batch_hint,
    fp16_packing_applies,
    onednn_pack_dtype,
)

MODELS = {"bench": dict(hidden=1024, heads=16, kv_heads=4, ffn=3584, layers=8),
          "real": dict(hidden=4096, heads=32, kv_heads=8, ffn=14336, layers=2)}  # 2 of 32 layers: memory
VOCAB = 128256


def linear_shapes(hidden: int, heads: int, kv_heads: int, ffn: int, layers: int) -> list[tuple[int, int]]:
    """(out, in) of every decode linear of one forward: each layer's four, then lm_head."""
    qkv = hidden + 2 * hidden // heads * kv_heads
    return [(qkv, hidden), (hidden, hidden), (2 * ffn, hidden), (hidden, ffn)] * layers + [(VOCAB, hidden)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--real", action="store_true",
                        help="2 of the real model's layers and its lm_head (1.9 GB in bf16)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    shapes = linear_shapes(**MODELS["real" if args.real else "bench"])
    generator = torch.Generator().manual_seed(0)
    weights = [(torch.randn(shape, generator=generator) * 0.02).to(dtype) for shape in shapes]
    kernels = {"plain": [DenseLinear(w) for w in weights]}
    pack_dtype = onednn_pack_dtype(dtype)
    if pack_dtype is not None:
        kernels["packed"] = [PackedLinear(w, pack_dtype) for w in weights]
    if fp16_packing_applies(dtype):
        kernels["fp16"] = [Fp16Linear(w) for w in weights]
    del weights
    layer_bytes, head_bytes = (sum(o * i for o, i in part) * dtype.itemsize for part in (shapes[:-1], shapes[-1:]))

    print(f"torch threads {torch.get_num_threads()}, dtype {args.dtype}, {len(shapes) - 1} layer linears "
          f"({layer_bytes / 1e9:.2f} GB) + lm_head ({head_bytes / 1e9:.2f} GB), best of {args.repeats}")
    print(f"{'rows':>4} " + " ".join(f"{name + ' layers':>14} {name + ' lm_head':>14}" for name in kernels)
          + "   (ms; GB/s of the stored weights in brackets)")
    widths = {width for _, width in shapes}
    with torch.inference_mode():
        for rows in args.rows:
            inputs = {width: torch.randn(rows, width, generator=generator).to(dtype) for width in widths}
            best = {name: [float("inf"), float("inf")] for name in kernels}
            for _ in range(args.repeats):
                for name, modules in kernels.items():
                    start = time.perf_counter()
                    for (_, width), module in zip(shapes[:-1], modules[:-1]):
                        module(inputs[width])
                    middle = time.perf_counter()
                    modules[-1](inputs[shapes[-1][1]])
                    end = time.perf_counter()
                    best[name] = [min(best[name][0], middle - start), min(best[name][1], end - middle)]
            print(f"{rows:>4} " + " ".join(
                f"{f'{b[0] * 1e3:.1f} ({layer_bytes / b[0] / 1e9:.0f})':>14} "
                f"{f'{b[1] * 1e3:.1f} ({head_bytes / b[1] / 1e9:.0f})':>14}" for b in best.values()), flush=True)
    for batch in sorted({1, max(args.rows)}):
        with decode_batch_hint(batch):
            chosen = {f"{o}x{i}": cpu_linear_kind(o, i, dtype) for o, i in dict.fromkeys(shapes)}
        print(f"cpu_linear_kind with max_batch_size {batch}: {chosen}")


if __name__ == "__main__":
    main()
