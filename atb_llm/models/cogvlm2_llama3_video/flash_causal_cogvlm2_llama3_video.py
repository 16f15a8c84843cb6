"""FlashCogvlm2_llama3_videoForCausalLM: the paged forward contract of docs/DESIGN.md section 3.

Video reaches prefill either as per-sequence ``pixel_values`` / ``vision_embeds`` keyword lists
(direct path) or as shared-memory codes inside the vision slots of ``input_ids`` (service path).
"""

import numpy as np
import torch

from atb_llm.models.base.flash_causal_lm import FlashForCausalLM
from atb_llm.models.cogvlm2_llama3_video.config_cogvlm2_llama3_video import VISION_TOKENS_PER_FRAME
from atb_llm.models.cogvlm2_llama3_video.device_ops import decode_batch_hint, get_device_ops
from atb_llm.models.cogvlm2_llama3_video.modeling_cogvlm2_llama3_video import (
    AttentionMetadata,
    LanguageModel,
    VisionTower,
    VocabParallelHead,
    checkpoint_tensor_shapes,
)
from atb_llm.utils import shm_utils

# Tensors of CogVLM2 (image) that the video model does not have.
_VISUAL_EXPERT_MARKERS = ("vision_expert", "vision_mlp")


def check_checkpoint(config, weights) -> None:
    """Refuse a checkpoint that is not this model: visual-expert tensors, a missing tensor or a
    shape mismatch, each named."""
    if getattr(config, "quantize", None):
        raise ValueError(f"quantize={config.quantize!r}: this model is served from its bf16/fp16 checkpoint; "
                         "quantized weights are not supported")
    foreign = sorted(name for name in weights.routing if any(m in name for m in _VISUAL_EXPERT_MARKERS))
    if foreign:
        raise ValueError(f"the checkpoint has visual-expert tensors (e.g. {foreign[0]}): it is a CogVLM2 image "
                         "model, not cogvlm2-video-llama3-chat, which has no visual expert")
    for name, shape in checkpoint_tensor_shapes(config).items():
        if name not in weights.routing:
            raise ValueError(f"tensor {name} is missing from the checkpoint")
        actual = tuple(weights.get_shape(name))
        if actual != tuple(shape):
            raise ValueError(f"tensor {name} has shape {list(actual)}, config.json implies {list(shape)}")


class VideoEncoding:
    """The vision tower run over some frames a few layers at a time, so that a host can spread a long video's
    tower work over several engine steps (see ``start_video_encoding``)."""

    def __init__(self, model, pixel_values: torch.Tensor):
        self.model = model
        self.frames = int(pixel_values.shape[0])
        with torch.inference_mode():
            self._x = model.vision.embed(model.checked_pixels(pixel_values))
        self.layer = 0

    @property
    def layers_left(self) -> int:
        return len(self.model.vision.layers) - self.layer

    @torch.inference_mode()
    def advance(self, layers: int) -> None:
        end = min(self.layer + max(1, int(layers)), len(self.model.vision.layers))
        self._x = self.model.vision.run_layers(self._x, self.layer, end)
        self.layer = end

    @torch.inference_mode()
    def result(self) -> torch.Tensor:
        """The frames' features ``[frames * 66, hidden]`` (after the last layer)."""
        if self.layers_left:
            raise RuntimeError(f"{self.layers_left} vision layers have not run yet")
        return self.model.vision.project(self._x).reshape(-1, self.model.hidden_size)


class FlashCogvlm2_llama3_videoForCausalLM(FlashForCausalLM):
    def __init__(self, config, weights, **kwargs):
        super().__init__(config, weights, **kwargs)
        check_checkpoint(config, weights)
        self.is_multimodal = True
        self.pad_token_id = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.ops = get_device_ops(weights.device)
        self.vision = VisionTower(config.vision_config, weights, ops=self.ops)
        # The portable host's weight-only quantization of the LM linears ("w8a16"), from its own checkpoint; MindIE
        # passes none (its config.quantize, for pre-quantized checkpoints, is refused by check_checkpoint).
        self.linear_quantize = kwargs.get("linear_quantize")
        # Linear kernels are chosen for the batch sizes this host decodes at (MindIE and our runner pass it).
        with decode_batch_hint(kwargs.get("max_batch_size")):
            self.model = LanguageModel(config, weights, self.ops, quantize=self.linear_quantize)
            self.lm_head = VocabParallelHead(weights, ops=self.ops)

    # -- vision ------------------------------------------------------------------------------
    def checked_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be [frames, 3, H, W], got {list(pixel_values.shape)}")
        return pixel_values.to(self.placeholder.device)

    @torch.inference_mode()
    def encode_video(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Frames ``[T, 3, 224, 224]`` -> vision features ``[T * 66, hidden]`` for the vision slots."""
        return self.vision(self.checked_pixels(pixel_values)).reshape(-1, self.hidden_size)

    def start_video_encoding(self, pixel_values: torch.Tensor) -> VideoEncoding:
        """``encode_video`` in steps: ``advance(n)`` runs n more tower layers, ``result()`` gives the features."""
        return VideoEncoding(self, pixel_values)

    @property
    def vision_layer_cost(self) -> float:
        """The work of one vision-tower layer on one frame, in prompt tokens of this rank's language model
        (multiply-adds of the matmuls and attention): a host's per-step token budget can cover both."""
        vc, c = self.config.vision_config, self.config
        tokens, width = vc.num_positions, vc.hidden_size
        vision = tokens * (4 * width * width + 2 * width * vc.intermediate_size + 2 * tokens * width)
        world = getattr(self, "tp_world_size", 1) or 1
        head_dim = c.hidden_size // c.num_attention_heads
        per_layer = (c.hidden_size * (c.hidden_size + 2 * c.num_multi_query_heads * head_dim) + c.hidden_size ** 2
                     + 3 * c.hidden_size * c.intermediate_size)
        return vision / (per_layer * c.num_hidden_layers / world)

    def pixels_from_ids(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """Service path: the vision slots carry (name, shape) shm codes as negative ids."""
        codes = input_ids[input_ids < 0].tolist()
        if not codes:
            return None
        if len(codes) != 2:
            raise ValueError(f"expected one (shm name, shape) code pair in the vision slots, found {len(codes)} codes")
        return shm_utils.get_data_from_shm(codes[0], codes[1], dtype=np.float32)

    def vision_slot_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        return (input_ids == self.pad_token_id) | (input_ids < 0)

    def _prefill_embeddings(self, input_ids: torch.Tensor, input_lengths: list[int],
                            pixel_values: list | None, vision_embeds: list | None) -> torch.Tensor:
        """Token embeddings with each sequence's vision slots replaced by its video's features: from
        ``vision_embeds[i]`` (the features of exactly this sequence's slots in ``input_ids``; None: the sequence
        has no video), else from ``pixel_values[i]``, else from the shm codes in its slots."""
        if input_ids.numel() and int(input_ids.max()) >= self.vocab_size:
            raise ValueError(f"token id {int(input_ids.max())} is outside the vocabulary [0, {self.vocab_size})")
        embeds = self.model.embed_tokens(input_ids.clamp(min=0))
        slot_mask = self.vision_slot_mask(input_ids)
        start = 0
        for i, length in enumerate(input_lengths):
            seg = slice(start, start + length)
            start += length
            features = vision_embeds[i] if vision_embeds is not None else None
            if features is None and vision_embeds is not None and pixel_values is None:
                continue  # the caller says this sequence has no video: a generated token may equal the pad id
            if features is None:
                pixels = pixel_values[i] if pixel_values is not None else None
                if pixels is None:
                    pixels = self.pixels_from_ids(input_ids[seg])
                features = self.encode_video(pixels) if pixels is not None else None
            slots = int(slot_mask[seg].sum())
            if features is None:
                if slots:
                    raise ValueError(f"sequence {i} has {slots} vision slots but no video")
                continue
            if features.shape[0] != slots:
                raise ValueError(f"sequence {i}: {features.shape[0] // VISION_TOKENS_PER_FRAME} frames give "
                                 f"{features.shape[0]} vision features for {slots} vision slots")
            embeds[seg][slot_mask[seg]] = features.to(embeds.dtype)
        return embeds

    @torch.inference_mode()
    def prepare_prefill_token(self, multimodalparams, processor) -> tuple[torch.Tensor, torch.Tensor]:
        """MindIE's multimodal runner: (inputs_embeds ``[T, hidden]``, position_ids ``[T]``) for one request.

        ``processor`` is the tokenizer (the framework falls back to it when no AutoProcessor exists);
        ``multimodalparams`` carries ``text`` and ``video`` (a path, or None).
        """
        from atb_llm.models.cogvlm2_llama3_video.input_builder_cogvlm2_llama3_video import (
            Cogvlm2_llama3_videoInputBuilder,
        )

        tokenizer = getattr(processor, "tokenizer", processor)
        builder = Cogvlm2_llama3_videoInputBuilder(tokenizer, self.config)
        content = [{"text": multimodalparams.text or ""}]
        video = getattr(multimodalparams, "video", None)
        if isinstance(video, (list, tuple)):
            video = video[0] if video else None
        if video:
            content.insert(0, {"video": video})
        ids, pixels, _ = builder.prepare([{"role": "user", "content": content}])
        input_ids = torch.tensor(ids, device=self.placeholder.device)
        embeds = self._prefill_embeddings(input_ids, [len(ids)], [pixels], None)
        positions = torch.as_tensor(builder.generate_position_ids(np.asarray(ids)), device=input_ids.device)
        return embeds, positions

    # -- forward -----------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, input_ids, position_ids, is_prefill, kv_cache, block_tables, slots, input_lengths,
                max_seq_len, lm_head_indices=None, **kwargs) -> torch.Tensor:
        """MindIE's paged forward. A prefill may continue sequences that already have K/V in the cache (a
        prefix-cache hit, the next chunk of a chunked prefill, or a decode sharing the step), as MindIE's
        prefix-cache / SplitFuse path passes it: ``q_lens`` gives each sequence's new tokens and
        ``input_lengths`` its whole context; attention then reads the prefix from the paged cache."""
        lengths = [int(n) for n in input_lengths]
        position_ids = position_ids.long()
        slots = slots.long()
        q_lens = kwargs.get("q_lens")
        if q_lens is not None:
            q_lens = [int(n) for n in q_lens]
            if not is_prefill or q_lens == lengths:
                q_lens = None  # nothing cached before the new tokens: a plain prefill
        rows = q_lens or lengths
        if is_prefill:
            if input_ids.dim() == 2:  # embeddings prepared by the multimodal runner
                hidden = input_ids.to(self.dtype)
            else:
                hidden = self._prefill_embeddings(input_ids.long(), rows, kwargs.get("pixel_values"),
                                                  kwargs.get("vision_embeds"))
            context = None if q_lens is None else torch.as_tensor(lengths, device=hidden.device)
            tables = None if q_lens is None else block_tables.long()
            meta = AttentionMetadata(is_prefill=True, slots=slots, seq_lens=rows, block_tables=tables,
                                     context_lens=context, q_lens=q_lens)
        else:
            hidden = self.model.embed_tokens(input_ids.long())
            meta = AttentionMetadata(is_prefill=False, slots=slots, seq_lens=lengths,
                                     block_tables=block_tables.long(), context_lens=torch.as_tensor(
                                         lengths, device=hidden.device))
        hidden = self.model(hidden, position_ids, kv_cache, meta)
        if is_prefill:
            if lm_head_indices is None:
                lm_head_indices = torch.tensor(rows, device=hidden.device).cumsum(0) - 1
            hidden = hidden[lm_head_indices.long()]
        return self.lm_head(hidden).float()
