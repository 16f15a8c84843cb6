"""CogVLM2-Video-Llama3-Chat built from vLLM's own layers (docs/MODEL.md sections 2, 5 and 6).

- Language model: a Llama-3 decoder whose every token, vision slot or text, goes through the
  ``language_expert_*`` / ``language_mlp`` weights (the video model has no visual expert). The fused
  ``language_expert_query_key_value`` is a ``QKVParallelLinear`` loaded as one fused tensor, so tensor
  parallelism splits it per head group as vLLM does for every GQA model; ``gate_proj`` / ``up_proj`` are
  stacked into one ``MergedColumnParallelLinear``; ``language_expert_dense`` and ``down_proj`` are row
  parallel. ``RMSNorm``, ``get_rope`` (RoPE base 500000, rotate-half) and ``Attention`` are vLLM's, so a
  platform plugin (vllm-ascend) swaps in its kernels.
- Vision tower (EVA2-CLIP-E, post-norm blocks, then a 2x2 conv and a GLU adapter): the fused
  ``query_key_value`` is a ``QKVParallelLinear`` with bias, attention is ``MMEncoderAttention`` (vLLM's
  encoder attention, bidirectional), ``fc1`` / ``fc2`` are column / row parallel.
- Positions: CogVLM's (each frame's 66 slots take three positions), given to vLLM through the M-RoPE hook
  ``get_mrope_input_positions`` as three identical rows; the decoder applies ordinary 1-D RoPE to row 0.
"""
from collections.abc import Iterable, Mapping
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention, MMEncoderAttention
from vllm.model_executor.layers.conv import Conv2dLayer
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import SupportsMRoPE, SupportsMultiModal, SupportsPP
from vllm.model_executor.models.utils import (
    PPMissingLayer,
    is_pp_missing_parameter,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.sequence import IntermediateTensors

from vllm_cogvlm2._shared import vision_aware_positions
from vllm_cogvlm2.processing import (
    CogVLM2VideoDummyInputsBuilder,
    CogVLM2VideoMultiModalProcessor,
    CogVLM2VideoProcessingInfo,
)

# ----------------------------------------------------------------------------------------------------
# Vision tower (docs/MODEL.md section 2)
# ----------------------------------------------------------------------------------------------------


class VisionAttention(nn.Module):
    def __init__(self, vc: Mapping, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        width, heads = vc["hidden_size"], vc["num_heads"]
        tp = get_tensor_model_parallel_world_size()
        if heads % tp:
            raise ValueError(f"the vision tower's {heads} heads do not split over tensor-parallel size {tp}")
        self.head_dim = width // heads
        self.query_key_value = QKVParallelLinear(width, self.head_dim, heads, bias=True, quant_config=quant_config,
                                                 prefix=f"{prefix}.query_key_value")
        self.dense = RowParallelLinear(width, width, bias=True, quant_config=quant_config, prefix=f"{prefix}.dense")
        self.attn = MMEncoderAttention(heads // tp, self.head_dim, self.head_dim ** -0.5, prefix=f"{prefix}.attn")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.query_key_value(x)  # [frames, L, 3 * local heads * head_dim], rows q | k | v
        q, k, v = qkv.chunk(3, dim=-1)
        out, _ = self.dense(self.attn(q, k, v))
        return out


class VisionMLP(nn.Module):
    def __init__(self, vc: Mapping, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        if vc.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"unsupported vision activation {vc['hidden_act']!r}; the model uses exact gelu")
        self.fc1 = ColumnParallelLinear(vc["hidden_size"], vc["intermediate_size"], bias=True,
                                        quant_config=quant_config, prefix=f"{prefix}.fc1")
        self.fc2 = RowParallelLinear(vc["intermediate_size"], vc["hidden_size"], bias=True,
                                     quant_config=quant_config, prefix=f"{prefix}.fc2")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.fc1(x)
        x, _ = self.fc2(F.gelu(x))  # exact (erf) GELU
        return x


class VisionBlock(nn.Module):
    """Norm after the sublayer: ``x + LN(attention(x))``, then ``x + LN(mlp(x))``."""

    def __init__(self, vc: Mapping, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        width, eps = vc["hidden_size"], vc["layer_norm_eps"]
        self.input_layernorm = nn.LayerNorm(width, eps=eps)
        self.attention = VisionAttention(vc, quant_config, f"{prefix}.attention")
        self.mlp = VisionMLP(vc, quant_config, f"{prefix}.mlp")
        self.post_attention_layernorm = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.input_layernorm(self.attention(x))
        return x + self.post_attention_layernorm(self.mlp(x))


class PatchEmbedding(nn.Module):
    def __init__(self, vc: Mapping):
        super().__init__()
        width, patch = vc["hidden_size"], vc["patch_size"]
        self.proj = Conv2dLayer(vc["in_channels"], width, kernel_size=patch, stride=patch, bias=True)
        self.cls_embedding = nn.Parameter(torch.empty(1, width))
        self.position_embedding = nn.Embedding(vc["num_positions"], width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.proj(pixels).flatten(2).transpose(1, 2)  # [frames, grid * grid, D], row-major
        cls = self.cls_embedding.unsqueeze(0).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight.unsqueeze(0)


class GLUAdapter(nn.Module):
    """``linear_proj``, LayerNorm ``norm1`` (eps 1e-5), GELU, then ``dense_4h_to_h(silu(gate) * up)``."""

    def __init__(self, hidden: int, inner: int, width: int, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        # Replicated: the LayerNorm that follows needs every feature.
        self.linear_proj = ReplicatedLinear(width, hidden, bias=False, quant_config=quant_config,
                                            prefix=f"{prefix}.linear_proj")
        self.norm1 = nn.LayerNorm(hidden, eps=1e-5)
        # checkpoint gate_proj -> shard 0, dense_h_to_4h -> shard 1
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [inner, inner], bias=False, quant_config=quant_config,
                                                       prefix=f"{prefix}.gate_up_proj")
        self.act = SiluAndMul()
        self.dense_4h_to_h = RowParallelLinear(inner, hidden, bias=False, quant_config=quant_config,
                                               prefix=f"{prefix}.dense_4h_to_h")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.linear_proj(x)
        x = F.gelu(self.norm1(x))
        x, _ = self.gate_up_proj(x)
        x, _ = self.dense_4h_to_h(self.act(x))
        return x


class VisionTransformer(nn.Module):
    def __init__(self, vc: Mapping, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        self.layers = nn.ModuleList([VisionBlock(vc, quant_config, f"{prefix}.layers.{j}")
                                     for j in range(vc["num_hidden_layers"])])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class CogVLM2VisionTower(nn.Module):
    """One frame ``[3, 224, 224]`` -> 66 vectors of the LM width: boi, 8 x 8 patches, eoi."""

    def __init__(self, config, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        vc = config.vision_config
        width, hidden = vc["hidden_size"], config.hidden_size
        self.grid = vc["image_size"] // vc["patch_size"]
        self.patch_embedding = PatchEmbedding(vc)
        self.transformer = VisionTransformer(vc, quant_config, f"{prefix}.transformer")
        self.conv = Conv2dLayer(width, width, kernel_size=2, stride=2, bias=True)
        self.linear_proj = GLUAdapter(hidden, config.intermediate_size, width, quant_config, f"{prefix}.linear_proj")
        self.boi = nn.Parameter(torch.empty(1, 1, hidden))
        self.eoi = nn.Parameter(torch.empty(1, 1, hidden))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(dtype=self.boi.dtype, device=self.boi.device)
        x = self.transformer(self.patch_embedding(pixels))
        frames, _, width = x.shape
        x = x[:, 1:].reshape(frames, self.grid, self.grid, width).permute(0, 3, 1, 2)
        x = self.conv(x).flatten(2).transpose(1, 2)  # [frames, (grid / 2) ** 2, D]
        x = self.linear_proj(x)
        boi = self.boi.expand(frames, -1, -1)
        eoi = self.eoi.expand(frames, -1, -1)
        return torch.cat([boi, x, eoi], dim=1)  # [frames, 66, H]


# ----------------------------------------------------------------------------------------------------
# Language model (docs/MODEL.md section 6)
# ----------------------------------------------------------------------------------------------------


class LanguageAttention(nn.Module):
    def __init__(self, config, cache_config, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_multi_query_heads
        tp = get_tensor_model_parallel_world_size()
        if heads % tp or (kv_heads % tp and tp % kv_heads):
            raise ValueError(f"{heads} query / {kv_heads} kv heads do not fit tensor-parallel size {tp}")
        self.head_dim = hidden // heads
        self.q_size = heads // tp * self.head_dim
        self.kv_size = max(1, kv_heads // tp) * self.head_dim
        self.language_expert_query_key_value = QKVParallelLinear(
            hidden, self.head_dim, heads, kv_heads, bias=False, quant_config=quant_config,
            prefix=f"{prefix}.language_expert_query_key_value")
        self.language_expert_dense = RowParallelLinear(hidden, hidden, bias=False, quant_config=quant_config,
                                                       prefix=f"{prefix}.language_expert_dense")
        self.rotary_emb = get_rope(self.head_dim, max_position=config.max_position_embeddings, is_neox_style=True,
                                   rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta})
        self.attn = Attention(heads // tp, self.head_dim, self.head_dim ** -0.5, num_kv_heads=max(1, kv_heads // tp),
                              cache_config=cache_config, quant_config=quant_config, prefix=f"{prefix}.attn")

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.language_expert_query_key_value(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.language_expert_dense(self.attn(q, k, v))
        return out


class LanguageMLP(nn.Module):
    def __init__(self, config, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"unsupported activation {config.hidden_act!r}; the model uses silu")
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2, bias=False,
                                                       quant_config=quant_config, prefix=f"{prefix}.gate_up_proj")
        self.act = SiluAndMul()
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=False,
                                           quant_config=quant_config, prefix=f"{prefix}.down_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.gate_up_proj(x)
        x, _ = self.down_proj(self.act(x))
        return x


class DecoderLayer(nn.Module):
    def __init__(self, config, cache_config, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = LanguageAttention(config, cache_config, quant_config, f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = nn.Module()
        self.mlp.language_mlp = LanguageMLP(config, quant_config, f"{prefix}.mlp.language_mlp")

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp.language_mlp(hidden_states), residual


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": -1, "intermediate_tensors": 0,
                                         "inputs_embeds": 0})
class CogVLM2LanguageModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        cache_config, quant_config = vllm_config.cache_config, vllm_config.quant_config
        self.config = config
        if get_pp_group().is_first_rank:
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, quant_config=quant_config,
                                                       prefix=f"{prefix}.embed_tokens")
        else:
            self.embed_tokens = PPMissingLayer()
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: DecoderLayer(config, cache_config, quant_config, prefix),
            prefix=f"{prefix}.layers")
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps) if get_pp_group().is_last_rank \
            else PPMissingLayer()
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], config.hidden_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor | IntermediateTensors:
        if get_pp_group().is_first_rank:
            hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
            residual = None
        else:
            hidden_states, residual = intermediate_tensors["hidden_states"], intermediate_tensors["residual"]
        for layer in self.layers[self.start_layer:self.end_layer]:
            hidden_states, residual = layer(positions, hidden_states, residual)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": hidden_states, "residual": residual})
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


# ----------------------------------------------------------------------------------------------------
# The model vLLM runs
# ----------------------------------------------------------------------------------------------------

# checkpoint name fragment -> (parameter name fragment, shard of a stacked linear)
_STACKED = (
    (".mlp.language_mlp.gate_proj.", ".mlp.language_mlp.gate_up_proj.", 0),
    (".mlp.language_mlp.up_proj.", ".mlp.language_mlp.gate_up_proj.", 1),
    (".linear_proj.gate_proj.", ".linear_proj.gate_up_proj.", 0),
    (".linear_proj.dense_h_to_4h.", ".linear_proj.gate_up_proj.", 1),
)
_IMAGE_MODEL_MARKERS = ("vision_expert", "vision_mlp")


@MULTIMODAL_REGISTRY.register_processor(CogVLM2VideoMultiModalProcessor, info=CogVLM2VideoProcessingInfo,
                                        dummy_inputs=CogVLM2VideoDummyInputsBuilder)
class CogVLM2VideoForCausalLM(nn.Module, SupportsMultiModal, SupportsMRoPE, SupportsPP):
    """``CogVLMVideoForCausalLM`` (THUDM/cogvlm2-video-llama3-chat) for vLLM."""

    packed_modules_mapping: ClassVar[dict[str, list[str]]] = {"gate_up_proj": ["gate_proj", "up_proj"]}

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("video"):
            # No text placeholder: the video always goes right after bos (docs/MODEL.md section 4), wherever the
            # prompt mentions it; the processor inserts its slots there.
            return None
        raise ValueError(f"cogvlm2-video-llama3-chat takes a video, not {modality!r}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        quant_config = vllm_config.quant_config
        self.config = config
        with self._mark_composite_model(vllm_config, language_targets=CogVLM2LanguageModel,
                                        tower_targets={"video": CogVLM2VisionTower}):
            self.model = CogVLM2LanguageModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
            self.vision = CogVLM2VisionTower(config, quant_config, prefix=maybe_prefix(prefix, "vision"))
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=quant_config,
                                          prefix=maybe_prefix(prefix, "lm_head"))
            self.logits_processor = LogitsProcessor(config.vocab_size)
        else:
            self.lm_head = PPMissingLayer()
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    # -- multimodal --
    def embed_multimodal(self, **kwargs: object) -> tuple[torch.Tensor, ...]:
        pixels = kwargs.pop("pixel_values_videos", None)
        if pixels is None:
            return ()
        frames = kwargs.pop("video_num_frames")
        if isinstance(pixels, (list, tuple)):
            pixels = torch.cat(list(pixels))
        counts = [int(n) for n in torch.as_tensor(frames).reshape(-1).tolist()]
        features = self.vision(pixels)  # [sum T, 66, H]
        return tuple(f.reshape(-1, features.shape[-1]) for f in features.split(counts))

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list) -> tuple[torch.Tensor, int]:
        """CogVLM position ids (docs/MODEL.md section 5) as three identical M-RoPE rows, and the delta that
        continues them for generated tokens (next position = prompt's last + 1, not the KV length)."""
        vision = np.zeros(len(input_tokens), dtype=bool)
        for feature in mm_features:
            place = feature.mm_position
            mask = place.is_embed
            span = np.ones(place.length, dtype=bool) if mask is None else mask.cpu().numpy().astype(bool)
            vision[place.offset:place.offset + place.length] |= span
        positions = vision_aware_positions(vision)
        delta = int(positions[-1]) + 1 - len(input_tokens) if len(positions) else 0
        return torch.from_numpy(np.ascontiguousarray(np.broadcast_to(positions, (3, len(positions))))), delta

    # -- forward --
    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs: object) -> torch.Tensor | IntermediateTensors:
        if positions.ndim == 2:  # the three M-RoPE rows are identical: plain RoPE on the first
            positions = positions[0]
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    # -- weights --
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Checkpoint names (docs/MODEL.md section 1) -> parameters. A visual-expert tensor (the CogVLM2 image
        model) or any tensor this model has no place for is refused, never skipped."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if any(marker in name for marker in _IMAGE_MODEL_MARKERS):
                raise ValueError(f"checkpoint tensor {name!r} belongs to a visual expert: this is a CogVLM2 image "
                                 "checkpoint, not cogvlm2-video-llama3-chat (which has no visual expert)")
            if name.startswith("model.vision."):
                name = name[len("model."):]
            if "rotary_emb.inv_freq" in name:
                continue
            shard = None
            for old, new, shard_id in _STACKED:
                if old in name:
                    name, shard = name.replace(old, new), shard_id
                    break
            if is_pp_missing_parameter(name, self):
                continue
            param = params.get(name)
            if param is None:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}: "
                                 "not a cogvlm2-video-llama3-chat checkpoint?")
            loader = getattr(param, "weight_loader", default_weight_loader)
            if shard is None:
                loader(param, tensor)
            else:
                loader(param, tensor, shard)
            loaded.add(name)
        return loaded

