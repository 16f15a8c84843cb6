"""Writes a full-size random cogvlm2-video-llama3-chat checkpoint (~12.5 B parameters) in the real HF layout.

The real config (docs/MODEL.md section 1: hidden 4096, 32 layers, 32/8 heads, ffn 14336, vocab 128256; vision
1792 wide, 63 layers), sharded safetensors named as HF names them (``model-00001-of-0000N.safetensors``) with
``model.safetensors.index.json``, ``config.json``, ``generation_config.json`` and the Llama-3 tokenizer files the
tiny demo checkpoint ships. Tensors are made and written one shard at a time, so memory stays near one shard
(``--shard_gb``), never the model. For benchmarks of the real sizes only: about 25 GB of disk in bf16 (50 GB in
fp32), minutes to write, and loading it needs about as much RAM. Never run by the tests.

    .venv/bin/python -m benchmarks.make_full_size_checkpoint DIR [--dtype bfloat16] [--shard_gb 4.9]
"""
import argparse
import json
import math
import os
import shutil

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from atb_llm.demo.make_demo import REAL_FIELDS, write_checkpoint_files
from atb_llm.models.cogvlm2_llama3_video.config_cogvlm2_llama3_video import Cogvlm2_llama3_videoConfig
from atb_llm.models.cogvlm2_llama3_video.modeling_cogvlm2_llama3_video import checkpoint_tensor_shapes

FULL_SIZE = {
    "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_multi_query_heads": 8,
    "num_hidden_layers": 32,
    "vision_config": {"hidden_size": 1792, "intermediate_size": 15360, "num_heads": 16, "num_hidden_layers": 63,
                      "image_size": 224, "patch_size": 14, "num_positions": 257, "layer_norm_eps": 1e-6,
                      "in_channels": 3, "hidden_act": "gelu", "dropout_prob": 0.0},
}


def _layer_key(name: str) -> tuple:
    """The LM's embedding, its layers by index, its norm and lm_head, then the vision tower by layer."""
    numbers = tuple(int(p) for p in name.split(".") if p.isdigit())
    if name.startswith("model.vision"):
        group = 3
    else:
        group = 0 if "embed_tokens" in name else 1 if numbers else 2
    return (group, numbers, name)


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Scaled like a trained model's (norm weights near 1, linears ~1/sqrt(fan_in)), so activations stay finite
    through 32 layers; made in chunks of rows to bound the fp32 temporary."""
    if name.endswith(("layernorm.weight", "norm.weight", "norm1.weight")):
        return (1.0 + 0.1 * torch.randn(shape, generator=generator)).to(dtype)
    if name.endswith("bias"):
        return (0.02 * torch.randn(shape, generator=generator)).to(dtype)
    std = 1.0 if name.endswith(("embed_tokens.weight", "position_embedding.weight", "cls_embedding", ".boi", ".eoi")) \
        else 1 / math.sqrt(math.prod(shape[1:]) if len(shape) > 1 else shape[0])
    out = torch.empty(shape, dtype=dtype)
    rows = max(1, (1 << 24) // max(1, math.prod(shape[1:])))
    for start in range(0, shape[0], rows):
        block = out[start:start + rows]
        block.copy_(torch.randn(block.shape, generator=generator).mul_(std))
    return out


def plan_shards(shapes: dict, element_size: int, shard_bytes: int) -> list[list[str]]:
    """Tensor names grouped into shards of at most ``shard_bytes`` (a bigger tensor gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(shapes, key=_layer_key):
        nbytes = math.prod(shapes[name]) * element_size
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def full_size_fields(dtype: torch.dtype, overrides: dict | None = None) -> dict:
    """config.json of the real checkpoint, ``overrides`` applied (e.g. fewer layers for a quick check)."""
    fields = json.loads(json.dumps(dict(REAL_FIELDS, **FULL_SIZE)))
    for key, value in (overrides or {}).items():
        if key == "vision_config":
            fields["vision_config"].update(value)
        else:
            fields[key] = value
    fields["torch_dtype"] = str(dtype).removeprefix("torch.")
    return fields


def tensor_shapes(fields: dict) -> dict:
    return checkpoint_tensor_shapes(Cogvlm2_llama3_videoConfig.from_dict(json.loads(json.dumps(fields))))


def write_checkpoint(path: str, dtype: torch.dtype = torch.bfloat16, shard_gb: float = 4.9, seed: int = 0,
                     overrides: dict | None = None) -> str:
    """Writes the checkpoint into ``path`` shard by shard and returns ``path``."""
    fields = full_size_fields(dtype, overrides)
    shapes = tensor_shapes(fields)
    element_size = torch.empty(0, dtype=dtype).element_size()
    shards = plan_shards(shapes, element_size, int(shard_gb * (1 << 30)))
    total_params = sum(math.prod(s) for s in shapes.values())
    os.makedirs(path, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    weight_map = {}
    bar = tqdm(total=total_params * element_size, unit="B", unit_scale=True, desc="writing shards")
    for index, names in enumerate(shards):
        filename = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            tensors[name] = random_tensor(name, shapes[name], generator, dtype)
            bar.update(tensors[name].numel() * element_size)
        partial = os.path.join(path, f".{filename}.part")
        save_file(tensors, partial, metadata={"format": "pt"})
        os.replace(partial, os.path.join(path, filename))
        weight_map.update(dict.fromkeys(names, filename))
        del tensors  # the next shard starts from nothing
    bar.close()
    with open(os.path.join(path, "model.safetensors.index.json"), "w", encoding="utf-8") as file:
        json.dump({"metadata": {"total_size": total_params * element_size}, "weight_map": weight_map}, file,
                  indent=2)
    write_checkpoint_files(path, fields)
    print(f"{total_params / 1e9:.2f} B parameters in {len(shards)} shards written to {path}")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="directory to write the checkpoint into")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--shard_gb", type=float, default=4.9, help="largest shard, GiB (HF's default is ~5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder layers (default: the real 32); fewer for a quick check of the script")
    parser.add_argument("--vision_layers", type=int, default=None, help="vision layers (default: the real 63)")
    args = parser.parse_args()
    overrides: dict = {}
    if args.layers is not None:
        overrides["num_hidden_layers"] = args.layers
    if args.vision_layers is not None:
        overrides["vision_config"] = {"num_hidden_layers": args.vision_layers}
    dtype = getattr(torch, args.dtype)
    needed = sum(math.prod(s) for s in tensor_shapes(full_size_fields(dtype, overrides)).values())
    needed *= torch.empty(0, dtype=dtype).element_size()
    os.makedirs(args.path, exist_ok=True)
    free = shutil.disk_usage(args.path).free
    if free < needed * 1.02:
        raise SystemExit(f"{args.path} has {free / 2**30:.1f} GiB free; the checkpoint needs {needed / 2**30:.1f} GiB")
    write_checkpoint(args.path, dtype, args.shard_gb, args.seed, overrides)


if __name__ == "__main__":
    main()
