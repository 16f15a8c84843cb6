"""A dense reference of cogvlm2-video-llama3-chat written from docs/MODEL.md alone.

No KV cache, no paging, plain full attention in fp32, position ids by the rule of section 5 written as
a loop. It imports nothing from the plugin: tests compare the paged runtime against it.
"""
import glob
import json
import math
import os

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

VISION_SLOTS = 66


def load_checkpoint(model_dir: str):
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as file:
        config = json.load(file)
    tensors = {}
    for path in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
        tensors.update({k: v.float() for k, v in load_file(path).items()})
    return config, tensors


def reference_positions(is_vision: list[bool]) -> list[int]:
    """docs/MODEL.md section 5, literally."""
    n = len(is_vision)
    counts_as_language = []
    for i in range(n):
        if not is_vision[i]:
            counts_as_language.append(True)
            continue
        run_start = i == 0 or not is_vision[i - 1]
        run_end = i == n - 1 or not is_vision[i + 1]
        counts_as_language.append(run_start or run_end)
    positions = [0]
    for i in range(1, n):
        first_vision_after_language = is_vision[i] and counts_as_language[i - 1] and not counts_as_language[i]
        if counts_as_language[i] or first_vision_after_language:
            positions.append(positions[-1] + 1)
        else:
            positions.append(positions[-1])
    return positions


class DenseReference:
    def __init__(self, model_dir: str):
        self.config, self.w = load_checkpoint(model_dir)
        self.vision_config = self.config["vision_config"]

    # -- vision (section 2) --
    def vision(self, pixels: torch.Tensor) -> torch.Tensor:
        w, vc = self.w, self.vision_config
        p = "model.vision."
        x = F.conv2d(pixels.float(), w[p + "patch_embedding.proj.weight"], w[p + "patch_embedding.proj.bias"],
                     stride=vc["patch_size"])
        frames, width, grid, _ = x.shape
        x = x.reshape(frames, width, grid * grid).permute(0, 2, 1)
        cls = w[p + "patch_embedding.cls_embedding"].reshape(1, 1, width).repeat(frames, 1, 1)
        x = torch.cat([cls, x], dim=1) + w[p + "patch_embedding.position_embedding.weight"].unsqueeze(0)
        heads = vc["num_heads"]
        hd = width // heads
        eps = vc["layer_norm_eps"]
        for j in range(vc["num_hidden_layers"]):
            b = f"{p}transformer.layers.{j}."
            qkv = x @ w[b + "attention.query_key_value.weight"].T + w[b + "attention.query_key_value.bias"]
            qkv = qkv.reshape(frames, -1, 3, heads, hd)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [frames, L, heads, hd]
            scores = torch.einsum("flhd,fmhd->fhlm", q, k) / math.sqrt(hd)
            attn = torch.einsum("fhlm,fmhd->flhd", scores.softmax(-1), v).reshape(frames, -1, width)
            attn = attn @ w[b + "attention.dense.weight"].T + w[b + "attention.dense.bias"]
            x = x + F.layer_norm(attn, (width,), w[b + "input_layernorm.weight"], w[b + "input_layernorm.bias"], eps)
            h = x @ w[b + "mlp.fc1.weight"].T + w[b + "mlp.fc1.bias"]
            h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
            h = h @ w[b + "mlp.fc2.weight"].T + w[b + "mlp.fc2.bias"]
            x = x + F.layer_norm(h, (width,), w[b + "post_attention_layernorm.weight"],
                                 w[b + "post_attention_layernorm.bias"], eps)
        x = x[:, 1:].reshape(frames, grid, grid, width).permute(0, 3, 1, 2)
        x = F.conv2d(x, w[p + "conv.weight"], w[p + "conv.bias"], stride=2)
        x = x.reshape(frames, width, -1).permute(0, 2, 1)
        hidden = self.config["hidden_size"]
        x = x @ w[p + "linear_proj.linear_proj.weight"].T
        x = F.layer_norm(x, (hidden,), w[p + "linear_proj.norm1.weight"], w[p + "linear_proj.norm1.bias"], 1e-5)
        x = F.gelu(x)
        x = F.silu(x @ w[p + "linear_proj.gate_proj.weight"].T) * (x @ w[p + "linear_proj.dense_h_to_4h.weight"].T)
        x = x @ w[p + "linear_proj.dense_4h_to_h.weight"].T
        boi = w[p + "boi"].reshape(1, 1, hidden).repeat(frames, 1, 1)
        eoi = w[p + "eoi"].reshape(1, 1, hidden).repeat(frames, 1, 1)
        return torch.cat([boi, x, eoi], dim=1)  # [frames, 66, hidden]

    # -- language model (section 6) --
    def logits(self, ids: list[int], is_vision: list[bool], vision_features: torch.Tensor | None,
               last_only: bool = False) -> torch.Tensor:
        c, w = self.config, self.w
        hidden, heads, kv_heads = c["hidden_size"], c["num_attention_heads"], c["num_multi_query_heads"]
        hd = hidden // heads
        eps = c["rms_norm_eps"]
        x = w["model.embed_tokens.weight"][torch.tensor([0 if v else t for t, v in zip(ids, is_vision)])]
        if vision_features is not None:
            x[torch.tensor(is_vision)] = vision_features.reshape(-1, hidden)
        positions = torch.tensor(reference_positions(is_vision), dtype=torch.float64)
        inv_freq = 1.0 / (500000.0 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        angles = positions.float()[:, None] * inv_freq[None]
        cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

        def rms(t, weight):
            return weight * (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps))

        def rope(t):  # [n, heads, hd]
            half = hd // 2
            rotated = torch.cat([-t[..., half:], t[..., :half]], -1)
            return t * cos[:, None] + rotated * sin[:, None]

        n = len(ids)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        for i in range(c["num_hidden_layers"]):
            b = f"model.layers.{i}."
            h = rms(x, w[b + "input_layernorm.weight"])
            qkv = h @ w[b + "self_attn.language_expert_query_key_value.weight"].T
            q = qkv[:, :hidden].reshape(n, heads, hd)
            k = qkv[:, hidden:hidden + kv_heads * hd].reshape(n, kv_heads, hd)
            v = qkv[:, hidden + kv_heads * hd:].reshape(n, kv_heads, hd)
            q, k = rope(q), rope(k)
            group = heads // kv_heads
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
            scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
            scores = scores.masked_fill(~causal, float("-inf"))
            attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(n, hidden)
            x = x + attn @ w[b + "self_attn.language_expert_dense.weight"].T
            h = rms(x, w[b + "post_attention_layernorm.weight"])
            gate = F.silu(h @ w[b + "mlp.language_mlp.gate_proj.weight"].T)
            m = gate * (h @ w[b + "mlp.language_mlp.up_proj.weight"].T)
            x = x + m @ w[b + "mlp.language_mlp.down_proj.weight"].T
        x = rms(x, w["model.norm.weight"])
        if last_only:
            x = x[-1:]
        return x @ w["lm_head.weight"].T

    def greedy(self, ids: list[int], is_vision: list[bool], pixels: torch.Tensor | None, steps: int):
        """Greedy tokens and the logits of each step, recomputing the whole sequence every step."""
        features = self.vision(pixels) if pixels is not None else None
        ids, is_vision = list(ids), list(is_vision)
        tokens, step_logits = [], []
        for _ in range(steps):
            last = self.logits(ids, is_vision, features, last_only=True)[0]
            token = int(last.argmax())
            tokens.append(token)
            step_logits.append(last)
            ids.append(token)
            is_vision.append(False)
        return tokens, torch.stack(step_logits)


def chat_token_ids(tokenizer, config: dict, query: str, history, num_frames: int, template: str = "chat"):
    """Token layout of docs/MODEL.md section 4, written independently of the plugin: (ids, is_vision)."""
    def encode(text):
        return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    pad = config["pad_token_id"]
    ids, vision = [config["bos_token_id"]], [False]
    if template == "base":
        ids += [pad] * (VISION_SLOTS * num_frames)
        vision += [True] * (VISION_SLOTS * num_frames)
        prompt = query
    else:
        for t in range(num_frames):
            ids += [pad] * VISION_SLOTS
            vision += [True] * VISION_SLOTS
            time_ids = encode(str(t))
            ids += time_ids
            vision += [False] * len(time_ids)
        prompt = "".join(f"Question: {q} Answer: {a}\n" for q, a in history) + f"Question: {query} Answer:"
    prompt_ids = encode(prompt)
    return ids + prompt_ids, vision + [False] * len(prompt_ids)


def poison_kv_cache(cache_manager) -> None:
    """Fill every K/V slot with NaN: MindIE allocates its cache with torch.empty, so a slot holds garbage until
    written, and attention that reads one outside a sequence's context must show it."""
    for k_cache, v_cache in cache_manager.kv_cache:
        k_cache.fill_(float("nan"))
        v_cache.fill_(float("nan"))
    # A poisoned cache is a fresh one: no block holds a prefix any more (MindIE's CacheManager has no prefix cache).
    blocks = getattr(cache_manager, "block_manager", None)
    if blocks is not None and hasattr(blocks, "reset_prefix_cache"):
        blocks.reset_prefix_cache()
