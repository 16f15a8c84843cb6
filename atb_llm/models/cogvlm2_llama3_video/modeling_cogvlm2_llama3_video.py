"""Torch modules of cogvlm2-video-llama3-chat: the EVA2-CLIP vision tower with its adapter
(docs/MODEL.md section 2) and the Llama-3 decoder over a paged KV cache (section 6).

Every module loads its tensors from ``Weights`` by explicit name; the LM linears are
tensor-parallel (column / row) and the vision tower is replicated on every rank.
"""
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from atb_llm.models.cogvlm2_llama3_video.device_ops import make_linear
from atb_llm.models.cogvlm2_llama3_video.parallel_cogvlm2_llama3_video import (
    all_gather_last_dim,
    all_reduce,
    resolve_group,
)


def _parameter(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


def _tp_group(weights):
    """The torch.distributed group of the weights' tensor-parallel ranks (None for one process)."""
    return resolve_group(weights.process_group, weights.device)


def packed_qkv_shard(weights, name: str, num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """This rank's rows of a packed ``q | k | v`` weight: its query heads, then the key/value heads of
    their group. With fewer KV heads than ranks, each KV head is replicated on ``world // kv`` ranks."""
    rank, world = weights.process_group.rank(), weights.process_group.size()
    if num_heads % world:
        raise ValueError(f"{num_heads} query heads do not split over {world} ranks")
    if num_kv_heads % world and world % num_kv_heads:
        raise ValueError(f"{num_kv_heads} kv heads can neither be split nor replicated over {world} ranks")
    whole = weights.get_tensor(name)
    q, k, v = whole.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=0)
    q = q.chunk(world, dim=0)[rank]
    kv_parts = min(world, num_kv_heads)
    kv_index = rank * kv_parts // world
    k, v = k.chunk(kv_parts, dim=0)[kv_index], v.chunk(kv_parts, dim=0)[kv_index]
    return torch.cat([q, k, v], dim=0).contiguous()


class BackendLinear(nn.Module):
    """A linear layer whose matmul is the device backend's (``make_linear``: a prepacked, quantized or upcast
    weight on CPU, ``F.linear`` elsewhere); ``weight`` / ``bias`` are the backend module's, for inspection."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        self.linear = linear

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.linear, "bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class Linear(BackendLinear):
    """A replicated linear layer ``y = x W^T + b`` of the vision tower (fed many rows per call: its kernel is the
    backend's choice for throughput, ``make_linear(many_rows=True)``)."""

    def __init__(self, weights, prefix: str, bias: bool = False, ops=None):
        super().__init__(make_linear(ops, weights.get_tensor(f"{prefix}.weight"),
                                     bias=weights.get_tensor(f"{prefix}.bias") if bias else None, many_rows=True))


class ColumnParallelLinear(BackendLinear):
    """Output features split over ranks; each rank keeps its slice of the output."""

    def __init__(self, weight: torch.Tensor, ops=None, quantize: str | None = None):
        super().__init__(make_linear(ops, weight, quantize))


class RowParallelLinear(BackendLinear):
    """Input features split over ranks; partial products are summed with an all-reduce."""

    def __init__(self, weight: torch.Tensor, process_group, ops=None, quantize: str | None = None):
        super().__init__(make_linear(ops, weight, quantize))
        self.process_group = process_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(self.linear(x), self.process_group)


def _layer_norm(weights, prefix: str, eps: float) -> nn.LayerNorm:
    weight = weights.get_tensor(f"{prefix}.weight")
    norm = nn.LayerNorm(weight.shape[0], eps=eps, dtype=weight.dtype)
    norm.weight = _parameter(weight)
    norm.bias = _parameter(weights.get_tensor(f"{prefix}.bias"))
    return norm


def _conv(weights, prefix: str, stride: int) -> nn.Conv2d:
    weight = weights.get_tensor(f"{prefix}.weight")
    conv = nn.Conv2d(weight.shape[1], weight.shape[0], kernel_size=weight.shape[2:], stride=stride,
                     dtype=weight.dtype)
    conv.weight = _parameter(weight)
    conv.bias = _parameter(weights.get_tensor(f"{prefix}.bias"))
    return conv


# ----------------------------------------------------------------------------------------------
# Vision tower
# ----------------------------------------------------------------------------------------------
class VisionAttention(nn.Module):
    def __init__(self, weights, prefix: str, num_heads: int, ops=None):
        super().__init__()
        self.num_heads = num_heads
        self.query_key_value = Linear(weights, f"{prefix}.query_key_value", bias=True, ops=ops)
        self.dense = Linear(weights, f"{prefix}.dense", bias=True, ops=ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames, length, width = x.shape
        qkv = self.query_key_value(x).view(frames, length, 3, self.num_heads, width // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [frames, heads, length, head_dim]
        out = F.scaled_dot_product_attention(q, k, v)  # full attention, scale head_dim**-0.5
        return self.dense(out.transpose(1, 2).reshape(frames, length, width))


class VisionMLP(nn.Module):
    def __init__(self, weights, prefix: str, ops=None):
        super().__init__()
        self.fc1 = Linear(weights, f"{prefix}.fc1", bias=True, ops=ops)
        self.fc2 = Linear(weights, f"{prefix}.fc2", bias=True, ops=ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionBlock(nn.Module):
    """Post-norm ("sandwich") block: the LayerNorms act on the outputs of attention and MLP."""

    def __init__(self, weights, prefix: str, num_heads: int, eps: float, ops=None):
        super().__init__()
        self.attention = VisionAttention(weights, f"{prefix}.attention", num_heads, ops)
        self.mlp = VisionMLP(weights, f"{prefix}.mlp", ops)
        self.input_layernorm = _layer_norm(weights, f"{prefix}.input_layernorm", eps)
        self.post_attention_layernorm = _layer_norm(weights, f"{prefix}.post_attention_layernorm", eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.input_layernorm(self.attention(x))
        return x + self.post_attention_layernorm(self.mlp(x))


class VisionAdapter(nn.Module):
    """GLU projection from the vision width to the LM width."""

    def __init__(self, weights, prefix: str, ops=None):
        super().__init__()
        self.linear_proj = Linear(weights, f"{prefix}.linear_proj", ops=ops)
        self.norm1 = _layer_norm(weights, f"{prefix}.norm1", eps=1e-5)
        self.gate_proj = Linear(weights, f"{prefix}.gate_proj", ops=ops)
        self.dense_h_to_4h = Linear(weights, f"{prefix}.dense_h_to_4h", ops=ops)
        self.dense_4h_to_h = Linear(weights, f"{prefix}.dense_4h_to_h", ops=ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(self.linear_proj(x)))
        return self.dense_4h_to_h(F.silu(self.gate_proj(x)) * self.dense_h_to_4h(x))


class VisionTower(nn.Module):
    """Frames ``[T, 3, S, S]`` -> features ``[T, 66, H]`` (boi, 64 patches, eoi per frame)."""

    def __init__(self, vision_config, weights, prefix: str = "model.vision", ops=None):
        super().__init__()
        self.patch_embedding = _conv(weights, f"{prefix}.patch_embedding.proj", stride=vision_config.patch_size)
        self.cls_embedding = _parameter(weights.get_tensor(f"{prefix}.patch_embedding.cls_embedding"))
        self.position_embedding = _parameter(
            weights.get_tensor(f"{prefix}.patch_embedding.position_embedding.weight"))
        self.layers = nn.ModuleList(
            VisionBlock(weights, f"{prefix}.transformer.layers.{j}", vision_config.num_heads,
                        vision_config.layer_norm_eps, ops)
            for j in range(vision_config.num_hidden_layers))
        self.conv = _conv(weights, f"{prefix}.conv", stride=2)
        self.linear_proj = VisionAdapter(weights, f"{prefix}.linear_proj", ops)
        self.boi = _parameter(weights.get_tensor(f"{prefix}.boi"))
        self.eoi = _parameter(weights.get_tensor(f"{prefix}.eoi"))

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Frames ``[T, 3, S, S]`` -> the transformer's input ``[T, 1 + g*g, D]`` (cls, then the patch grid)."""
        frames = pixels.shape[0]
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # [T, D, g, g]
        x = x.flatten(2).transpose(1, 2)
        return torch.cat([self.cls_embedding.expand(frames, -1, -1), x], dim=1) + self.position_embedding

    def run_layers(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        for layer in self.layers[start:end]:
            x = layer(x)
        return x

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The transformer's output -> features ``[T, 66, H]``: downsample, adapter, boi / eoi."""
        frames, grid = x.shape[0], math.isqrt(x.shape[1] - 1)
        x = x[:, 1:].transpose(1, 2).reshape(frames, -1, grid, grid)  # drop cls, row-major grid
        x = self.conv(x).flatten(2).transpose(1, 2)  # [T, (g/2)^2, D]
        x = self.linear_proj(x)
        return torch.cat([self.boi.expand(frames, -1, -1), x, self.eoi.expand(frames, -1, -1)], dim=1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.project(self.run_layers(self.embed(pixels), 0, len(self.layers)))


# ----------------------------------------------------------------------------------------------
# Language model
# ----------------------------------------------------------------------------------------------
@dataclass
class AttentionMetadata:
    """What attention needs to know about the flattened batch of one step."""

    is_prefill: bool
    slots: torch.Tensor  # [T] flat KV slots of this step's tokens
    seq_lens: Sequence[int]  # prefill: rows per sequence
    block_tables: torch.Tensor | None = None  # decode, and prefill over a cached prefix: [B, max_blocks]
    context_lens: torch.Tensor | None = None  # decode: [B] tokens in cache incl. the new one(s)
    # Prefill over a cached prefix (prefix cache, chunked prefill, decodes sharing the step): the new rows per
    # sequence; sequence b's rows are its tokens context_lens[b] - q_lens[b] .. context_lens[b] - 1.
    q_lens: Sequence[int] | None = None


class RMSNorm(nn.Module):
    def __init__(self, weights, prefix: str, eps: float, ops):
        super().__init__()
        self.weight = _parameter(weights.get_tensor(f"{prefix}.weight"))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """cos/sin tables from CogVLM position ids; angles computed in fp32."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        self.register_buffer(
            "inv_freq", 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)),
            persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        angles = position_ids.float().unsqueeze(-1) * self.inv_freq
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


class LlamaAttention(nn.Module):
    def __init__(self, config, weights, prefix: str, ops, quantize: str | None = None):
        super().__init__()
        world = weights.process_group.size()
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_heads = config.num_attention_heads // world
        kv_heads = config.num_multi_query_heads
        self.num_kv_heads = max(kv_heads // world, 1)
        self.scale = self.head_dim ** -0.5
        self.ops = ops
        self.query_key_value = ColumnParallelLinear(packed_qkv_shard(
            weights, f"{prefix}.language_expert_query_key_value.weight", config.num_attention_heads, kv_heads,
            self.head_dim), ops, quantize)
        self.dense = RowParallelLinear(
            weights.get_multi_weights_row(f"{prefix}.language_expert_dense", quantize=config.quantize),
            _tp_group(weights), ops, quantize)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.query_key_value(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.ops.rope(q, k, cos, sin)
        k_cache, v_cache = kv_cache
        self.ops.write_kv(k_cache, v_cache, k, v, meta.slots)
        if meta.is_prefill and meta.q_lens is not None:
            out = self.ops.prefix_prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.q_lens,
                                                    meta.context_lens, self.scale)
        elif meta.is_prefill:
            out = self.ops.prefill_attention(q, k, v, meta.seq_lens, self.scale)
        else:
            out = self.ops.paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens,
                                                  self.scale)
        return self.dense(out.reshape(-1, q_size))


class LlamaMLP(nn.Module):
    def __init__(self, config, weights, prefix: str, ops=None, quantize: str | None = None):
        super().__init__()
        # gate and up in one matmul: each rank's rows are [its gate shard; its up shard].
        self.gate_up_proj = ColumnParallelLinear(weights.get_multi_weights_col(
            [f"{prefix}.gate_proj", f"{prefix}.up_proj"], quantize=config.quantize, dim=0), ops, quantize)
        self.down_proj = RowParallelLinear(
            weights.get_multi_weights_row(f"{prefix}.down_proj", quantize=config.quantize), _tp_group(weights),
            ops, quantize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Every token, text or vision, goes through the language-expert weights."""

    def __init__(self, config, weights, prefix: str, ops, quantize: str | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(weights, f"{prefix}.input_layernorm", config.rms_norm_eps, ops)
        self.self_attn = LlamaAttention(config, weights, f"{prefix}.self_attn", ops, quantize)
        self.post_attention_layernorm = RMSNorm(weights, f"{prefix}.post_attention_layernorm",
                                                config.rms_norm_eps, ops)
        self.mlp = LlamaMLP(config, weights, f"{prefix}.mlp.language_mlp", ops, quantize)

    def forward(self, h, cos, sin, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, kv_cache, meta)
        return h + self.mlp(self.post_attention_layernorm(h))


class LanguageModel(nn.Module):
    """The decoder; ``quantize`` ("w8a16" or None) applies to its linears (the device backend's ``make_linear``)."""

    def __init__(self, config, weights, ops, prefix: str = "model", quantize: str | None = None):
        super().__init__()
        self.embed_tokens = nn.Embedding.from_pretrained(weights.get_tensor(f"{prefix}.embed_tokens.weight"))
        self.layers = nn.ModuleList(
            DecoderLayer(config, weights, f"{prefix}.layers.{i}", ops, quantize)
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(weights, f"{prefix}.norm", config.rms_norm_eps, ops)
        self.rotary = RotaryEmbedding(config.hidden_size // config.num_attention_heads, config.rope_theta)

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor, kv_cache: list, meta: AttentionMetadata):
        cos, sin = self.rotary(position_ids, hidden.dtype)
        for layer, layer_cache in zip(self.layers, kv_cache):
            hidden = layer(hidden, cos, sin, layer_cache, meta)
        return self.norm(hidden)


class VocabParallelHead(BackendLinear):
    """lm_head split over the vocabulary; every rank gathers the full logits."""

    def __init__(self, weights, prefix: str = "lm_head", ops=None):
        super().__init__(make_linear(ops, weights.get_sharded(f"{prefix}.weight", dim=0)))
        self.process_group = _tp_group(weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the rows given: the caller passes only the rows that are sampled."""
        return all_gather_last_dim(self.linear(x), self.process_group)


def checkpoint_tensor_shapes(config) -> dict:
    """Every tensor of the HF checkpoint with its shape (docs/MODEL.md section 1)."""
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = hidden // config.num_attention_heads
    qkv_rows = hidden + 2 * config.num_multi_query_heads * head_dim
    vision = config.vision_config
    width, patch = vision.hidden_size, vision.patch_size
    shapes = {"model.embed_tokens.weight": (config.vocab_size, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (config.vocab_size, hidden)}
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}"
        shapes.update({
            f"{layer}.input_layernorm.weight": (hidden,),
            f"{layer}.self_attn.language_expert_query_key_value.weight": (qkv_rows, hidden),
            f"{layer}.self_attn.language_expert_dense.weight": (hidden, hidden),
            f"{layer}.post_attention_layernorm.weight": (hidden,),
            f"{layer}.mlp.language_mlp.gate_proj.weight": (inter, hidden),
            f"{layer}.mlp.language_mlp.up_proj.weight": (inter, hidden),
            f"{layer}.mlp.language_mlp.down_proj.weight": (hidden, inter),
        })
    prefix = "model.vision"
    shapes.update({
        f"{prefix}.patch_embedding.proj.weight": (width, vision.in_channels, patch, patch),
        f"{prefix}.patch_embedding.proj.bias": (width,),
        f"{prefix}.patch_embedding.cls_embedding": (1, width),
        f"{prefix}.patch_embedding.position_embedding.weight": (vision.num_positions, width),
        f"{prefix}.conv.weight": (width, width, 2, 2),
        f"{prefix}.conv.bias": (width,),
        f"{prefix}.linear_proj.linear_proj.weight": (hidden, width),
        f"{prefix}.linear_proj.norm1.weight": (hidden,),
        f"{prefix}.linear_proj.norm1.bias": (hidden,),
        f"{prefix}.linear_proj.gate_proj.weight": (inter, hidden),
        f"{prefix}.linear_proj.dense_h_to_4h.weight": (inter, hidden),
        f"{prefix}.linear_proj.dense_4h_to_h.weight": (hidden, inter),
        f"{prefix}.boi": (1, 1, hidden),
        f"{prefix}.eoi": (1, 1, hidden),
    })
    for j in range(vision.num_hidden_layers):
        block = f"{prefix}.transformer.layers.{j}"
        for name, shape in {"input_layernorm": (width,), "post_attention_layernorm": (width,)}.items():
            shapes[f"{block}.{name}.weight"] = shape
            shapes[f"{block}.{name}.bias"] = shape
        for name, (rows, cols) in {"attention.query_key_value": (3 * width, width),
                                   "attention.dense": (width, width),
                                   "mlp.fc1": (vision.intermediate_size, width),
                                   "mlp.fc2": (width, vision.intermediate_size)}.items():
            shapes[f"{block}.{name}.weight"] = (rows, cols)
            shapes[f"{block}.{name}.bias"] = (rows,)
    return shapes
