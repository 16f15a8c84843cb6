"""vLLM's multimodal processor for CogVLM2-Video: video in, frames by the template's rule, token layout out.

Token layout (docs/MODEL.md section 4): ``bos``, then for the chat / vqa templates per frame ``t`` 66 vision
slots (the pad id) followed by the tokens of ``str(t)`` (ordinary text), for base ``66 * T`` slots in one
block, then the prompt. The video's slots go right after ``bos`` wherever the prompt mentions the video (the
model has no placeholder token), as one ``PromptInsertion``; only the pad slots take vision features (boi,
64 patches, eoi per frame, in order), the time-index tokens stay text.

A video item in ``multi_modal_data={"video": ...}`` may be:
  - a path (``str`` / ``os.PathLike``) to a local file: decoded with the model's frame rule (only the chosen
    frames are decoded), the ATB plugin's ``load_video``;
  - ``bytes`` of an encoded file, or what vLLM's media connector returns for a ``video_url`` (decoded the
    same way, from the original bytes);
  - ``uint8`` frames ``[T, H, W, 3]`` already chosen (``T <= 24``): only the transform is applied;
  - model-ready ``float`` pixels ``[T, 3, 224, 224]``.
"""
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch
from transformers import BatchFeature
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.media.base import MediaWithBytes
from vllm.multimodal.parse import MultiModalDataItems, MultiModalDataParser, ProcessorBatchItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptIndexTargets,
    PromptInsertion,
    PromptUpdate,
    PromptUpdateDetails,
)

from vllm_cogvlm2._shared import NUM_FRAMES, VISION_TOKENS_PER_FRAME, VideoError, load_video, transform_frames
from vllm_cogvlm2.config import CogVLM2VideoConfig
from vllm_cogvlm2.media import EncodedVideo


@dataclass(frozen=True)
class VideoSource:
    """One video item, normalised: exactly one field is set."""

    path: str | None = None
    data: bytes | None = field(default=None, repr=False)
    frames: np.ndarray | None = field(default=None, repr=False)
    pixels: torch.Tensor | None = field(default=None, repr=False)

    def hash_key(self) -> object:
        """What vLLM's multimodal cache hashes: the file's identity and version, or the content itself."""
        if self.path is not None:
            try:
                stat = os.stat(self.path)
                return {"path": os.path.realpath(self.path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
            except OSError:
                return {"path": self.path}
        if self.data is not None:
            return self.data
        if self.frames is not None:
            return self.frames
        return self.pixels


def as_video_source(item: Any) -> VideoSource:
    if isinstance(item, VideoSource):
        return item
    if isinstance(item, (str, os.PathLike)):
        return VideoSource(path=os.fspath(item))
    if isinstance(item, (bytes, bytearray, memoryview)):
        return VideoSource(data=bytes(item))
    if isinstance(item, EncodedVideo):
        return VideoSource(data=item.data)
    if isinstance(item, MediaWithBytes):
        # From vLLM's media connector: whatever loader ran, decode the original file with the model's rule.
        return VideoSource(data=bytes(item.original_bytes))
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], (dict, type(None))):
        return as_video_source(item[0])  # vLLM's (frames, metadata) form
    if isinstance(item, (np.ndarray, torch.Tensor)):
        if item.ndim != 4:
            raise ValueError(f"a video given as an array must be 4-D, got shape {tuple(item.shape)}")
        if item.dtype in (np.uint8, torch.uint8):
            frames = item.cpu().numpy() if isinstance(item, torch.Tensor) else item
            if frames.shape[-1] != 3:
                raise ValueError(f"uint8 video frames must be [T, H, W, 3] RGB, got shape {frames.shape}")
            return VideoSource(frames=np.ascontiguousarray(frames))
        pixels = torch.as_tensor(item).to(torch.float32)
        if pixels.shape[1] != 3:
            raise ValueError(f"float video pixels must be [T, 3, H, W] (model-ready), got {tuple(pixels.shape)}")
        return VideoSource(pixels=pixels.contiguous())
    raise ValueError(f"unsupported video input of type {type(item).__name__}: give a path, the file's bytes, "
                     "uint8 frames [T, H, W, 3] or float pixels [T, 3, 224, 224]")


class CogVLM2VideoItems(ProcessorBatchItems[VideoSource | None]):
    def __init__(self, data: Sequence[VideoSource | None]) -> None:
        super().__init__(data, "video")

    def get_item_for_hash(self, index: int) -> object:
        item = self.data[index]
        return None if item is None else item.hash_key()


class CogVLM2VideoDataParser(MultiModalDataParser):
    def _parse_video_data(self, data: Any):
        if data is None:
            return None
        if isinstance(data, list):
            items = data
        elif isinstance(data, (np.ndarray, torch.Tensor)) and data.ndim == 5:
            items = list(data)
        else:
            items = [data]
        return CogVLM2VideoItems([None if item is None else as_video_source(item) for item in items])


class CogVLM2VideoProcessingInfo(BaseProcessingInfo):
    def get_hf_config(self) -> CogVLM2VideoConfig:
        return self.ctx.get_hf_config(CogVLM2VideoConfig)

    def get_hf_processor(self, **kwargs: object):
        raise NotImplementedError("cogvlm2-video-llama3-chat has no HF processor; the vLLM plugin processes videos")

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        return {}

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"video": 1}  # one video per conversation, as the model was trained

    def get_data_parser(self) -> MultiModalDataParser:
        return CogVLM2VideoDataParser(expected_hidden_size=self._get_expected_hidden_size(),
                                      allow_missing_mm_embeddings=self.allow_missing_mm_embeddings)

    @property
    def template(self) -> str:
        return self.get_hf_config().template_version

    @cached_property
    def _time_index_ids(self) -> list[list[int]]:
        tokenizer = self.get_tokenizer()
        return [list(tokenizer.encode(str(t), add_special_tokens=False)) for t in range(NUM_FRAMES)]

    def video_token_ids(self, num_frames: int) -> list[int]:
        """The video's part of the prompt (docs/MODEL.md section 4): what follows ``bos``."""
        pad = self.get_hf_config().pad_token_id
        if self.template == "base":
            return [pad] * (VISION_TOKENS_PER_FRAME * num_frames)
        ids: list[int] = []
        for t in range(num_frames):
            ids += [pad] * VISION_TOKENS_PER_FRAME
            ids += self._time_index_ids[t]
        return ids

    def video_pixels(self, source: VideoSource) -> torch.Tensor:
        """Model-ready float32 ``[T, 3, S, S]`` frames of one video item."""
        size = self.get_hf_config().vision_config["image_size"]
        if source.pixels is not None:
            pixels = source.pixels
        elif source.frames is not None:
            pixels = transform_frames(torch.from_numpy(source.frames).permute(3, 0, 1, 2).contiguous(), size)
        elif source.path is not None:
            pixels = load_video(source.path, template=self.template)
        else:
            pixels = self._decode_bytes(source.data)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(f"video pixels must be [T, 3, {size}, {size}], got {tuple(pixels.shape)}")
        if not 1 <= pixels.shape[0] <= NUM_FRAMES:
            raise ValueError(f"a video must have 1 to {NUM_FRAMES} frames, got {pixels.shape[0]}")
        return pixels.to(torch.float32)

    def _decode_bytes(self, data: bytes) -> torch.Tensor:
        # The ATB loader checks and decodes files; the container is sniffed from the content, not the suffix.
        with tempfile.TemporaryDirectory(prefix="cogvlm2-video-") as folder:
            path = os.path.join(folder, "video.mp4")
            with open(path, "wb") as file:
                file.write(data)
            try:
                return load_video(path, template=self.template)
            except VideoError as error:
                text = str(error).replace(f"video {path!r}", "the video").replace(repr(path), "the video")
                raise VideoError(text.replace(path, "the video")) from None


class CogVLM2VideoDummyInputsBuilder(BaseDummyInputsBuilder[CogVLM2VideoProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return ""

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options: Any = None):
        size = self.info.get_hf_config().vision_config["image_size"]
        count = mm_counts.get("video", 0)
        return {"video": [torch.zeros(NUM_FRAMES, 3, size, size) for _ in range(count)]}


class CogVLM2VideoMultiModalProcessor(BaseMultiModalProcessor[CogVLM2VideoProcessingInfo]):
    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        videos = list(hf_data.get("videos") or [])
        pixels = [self.info.video_pixels(video) for video in videos]
        return BatchFeature({
            "pixel_values_videos": torch.cat(pixels) if pixels else torch.empty(0, 3, 0, 0),
            "video_num_frames": torch.tensor([p.shape[0] for p in pixels], dtype=torch.int64),
        })

    def _get_mm_fields_config(self, hf_inputs: BatchFeature,
                              hf_processor_mm_kwargs: Mapping[str, object]) -> Mapping[str, MultiModalFieldConfig]:
        num_frames = hf_inputs.get("video_num_frames", torch.empty(0, dtype=torch.int64))
        return {
            "pixel_values_videos": MultiModalFieldConfig.flat_from_sizes("video", num_frames),
            "video_num_frames": MultiModalFieldConfig.batched("video", keep_on_cpu=True),
        }

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        config = self.info.get_hf_config()

        def insertion(item_idx: int) -> PromptUpdateDetails:
            num_frames = int(out_mm_kwargs["video"][item_idx]["video_num_frames"].data)
            return PromptUpdateDetails.select_token_id(self.info.video_token_ids(num_frames), config.pad_token_id)

        return [PromptInsertion(modality="video", target=PromptIndexTargets.prefix([config.bos_token_id]),
                                insertion=insertion)]

    def _postprocess_prompt(self, prompt: list[int]) -> list[int]:
        """Every layout starts with bos, and the video goes right after it."""
        bos = self.info.get_hf_config().bos_token_id
        return list(prompt) if prompt and prompt[0] == bos else [bos, *prompt]
