"""Prompt, token layout and position ids of cogvlm2-video-llama3-chat (docs/MODEL.md sections 4 and 5)."""
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from atb_llm.models.base.input_builder import InputBuilder
from atb_llm.models.cogvlm2_llama3_video.config_cogvlm2_llama3_video import TEMPLATES, VISION_TOKENS_PER_FRAME
from atb_llm.models.cogvlm2_llama3_video.data_preprocess_cogvlm2_llama3_video import (
    MAX_VIDEO_PIXELS,
    check_video_file,
    load_video,
)
from atb_llm.utils import shm_utils

ANSWER_ROLES = ("assistant", "system")  # the seed's multi-turn example sends earlier answers as "system"


@dataclass
class Conversation:
    """A conversation reduced to what the prompt templates use."""

    query: str
    history: list[tuple[str, str]]
    video: str | None


@dataclass
class PreparedPrompt:
    """A conversation laid out for prefill. ``cached``: the video was not decoded because the host already has
    its vision features (``cached_video_frames`` knew it); its slots hold the pad id and ``pixels`` is None."""

    ids: list[int]
    pixels: torch.Tensor | None
    video: str | None
    cached: bool = False


def _content_parts(content) -> tuple[str, list[str]]:
    """Text and video paths of one message's content (a string, or a list of content items)."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise ValueError(f"message content must be a string or a list of items, got {type(content).__name__}")
    texts, videos = [], []
    for item in content:
        if not isinstance(item, dict):
            raise ValueError(f"content items must be objects, got {type(item).__name__}")
        kind = item.get("type")
        if "text" in item and kind in (None, "text"):
            if not isinstance(item["text"], str):
                raise ValueError("a text item's text must be a string")
            texts.append(item["text"])
        elif "video" in item or kind == "video_url":
            video = item.get("video", item.get("video_url"))
            if isinstance(video, dict):
                video = video.get("url")
            if not isinstance(video, str) or not video:
                raise ValueError("a video item needs a path")
            videos.append(video)
        elif "image" in item or kind == "image_url":
            raise ValueError("images are not supported: cogvlm2-video-llama3-chat takes a video")
        else:
            raise ValueError(f"unsupported content item {sorted(item)}")
    return "".join(texts), videos


def parse_conversation(conversation: list[dict]) -> Conversation:
    """Pair each user turn with the answer after it; the last user turn is the query.

    A system message before the first user turn is a system prompt: the model's templates have no slot
    for one, so it is put in front of the first question.
    """
    if not isinstance(conversation, list) or not conversation:
        raise ValueError("the conversation must be a non-empty list of messages")
    turns: list[list[str]] = []
    videos: list[str] = []
    system_prompt = ""
    for message in conversation:
        if not isinstance(message, dict) or "role" not in message:
            raise ValueError("each message must be an object with a role")
        text, message_videos = _content_parts(message.get("content", ""))
        videos.extend(message_videos)
        role = message["role"]
        if role == "user":
            if turns and turns[-1][1] is None:  # two user turns in a row: one question
                turns[-1][0] += "\n" + text
            else:
                turns.append([text, None])
        elif role in ANSWER_ROLES:
            if not turns:
                system_prompt += text
            elif turns[-1][1] is None:
                turns[-1][1] = text
            else:
                turns[-1][1] += text
        else:
            raise ValueError(f"unsupported role {role!r}; use user, assistant or system")
    if not turns or turns[-1][1] is not None:
        raise ValueError("the conversation must end with a user message")
    if len(set(videos)) > 1:
        raise ValueError("one video per conversation: cogvlm2-video-llama3-chat answers about a single video")
    if system_prompt:
        turns[0][0] = f"{system_prompt}\n{turns[0][0]}"
    history = [(q, a) for q, a in turns[:-1]]
    return Conversation(query=turns[-1][0], history=history, video=videos[0] if videos else None)


def prompt_text(query: str, history: list[tuple[str, str]], template: str) -> str:
    if template == "base":
        return query
    answer_tag = "Short answer:" if template == "vqa" else "Answer:"
    past = "".join(f"Question: {q} {answer_tag} {a}\n" for q, a in history)
    return f"{past}Question: {query} {answer_tag}"


class Cogvlm2_llama3_videoInputBuilder(InputBuilder):
    # Frames larger than this are refused before decoding (a host serving untrusted video may lower it).
    max_video_pixels: int = MAX_VIDEO_PIXELS
    # Set by a host that caches vision features (MindIE sets nothing): video path -> its frame count when the
    # host already holds the video's features, else None. A hit lays out the vision slots without decoding.
    cached_video_frames: Callable[[str], int | None] | None = None

    def __init__(self, tokenizer, config, **kwargs):
        super().__init__(tokenizer, max_length=config.max_position_embeddings, **kwargs)
        if config.template_version not in TEMPLATES:
            raise ValueError(f"unknown template_version {config.template_version!r}")
        self.template = config.template_version
        self.bos_token_id = config.bos_token_id
        self.pad_token_id = config.pad_token_id
        self.vocab_size = config.vocab_size

    def encode_text(self, text: str) -> list[int]:
        """User text is text: special-token strings are split into ordinary tokens, so they can never
        create a vision slot or an id outside the embedding table."""
        ids = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"the tokenizer produced ids outside the vocabulary: {bad[:5]}")
        return list(ids)

    def build_ids(self, query: str, history: list[tuple[str, str]], num_frames: int) -> list[int]:
        """[bos], the vision slots (per frame with its time index for chat, one block for base), the prompt."""
        ids = [self.bos_token_id]
        if num_frames:
            if self.template == "base":
                ids += [self.pad_token_id] * (VISION_TOKENS_PER_FRAME * num_frames)
            else:
                for t in range(num_frames):
                    ids += [self.pad_token_id] * VISION_TOKENS_PER_FRAME
                    ids += self.encode_text(str(t))
        return ids + self.encode_text(prompt_text(query, history, self.template))

    def load_video(self, path: str):
        return load_video(path, template=self.template, max_pixels=self.max_video_pixels)

    def _cached_frames(self, video: str) -> int:
        lookup = self.cached_video_frames
        if lookup is None:
            return 0
        check_video_file(video)  # the same refusals as a decode (missing file, extension, size)
        try:
            return int(lookup(video) or 0)
        except (OSError, ValueError):  # unreadable now: the decode below says why
            return 0

    def prepare_prompt(self, conversation: list[dict], use_cache: bool = True) -> PreparedPrompt:
        """Ids with pad-id vision slots and the video's frames; with ``use_cache`` and a host that already holds
        the video's features, the frames are neither decoded nor transformed (``cached``)."""
        parsed = parse_conversation(conversation)
        pixels, frames = None, 0
        if parsed.video is not None:
            frames = self._cached_frames(parsed.video) if use_cache else 0
            if not frames:
                pixels = self.load_video(parsed.video)
                frames = pixels.shape[0]
        return PreparedPrompt(self.build_ids(parsed.query, parsed.history, frames), pixels, parsed.video,
                              cached=pixels is None and frames > 0)

    def prepare(self, conversation: list[dict]) -> tuple[list[int], torch.Tensor | None, str | None]:
        """Direct path: (ids with pad-id vision slots, the video's frames or None, the video path)."""
        prepared = self.prepare_prompt(conversation, use_cache=False)
        return prepared.ids, prepared.pixels, prepared.video

    def make_context(self, rank: int, conversation: list[dict], add_generation_prompt: bool = True,
                     adapt_to_max_length: bool = False, **kwargs) -> list[int]:
        """Service path: ids whose vision slots carry the shm codes of the preprocessed video. When the host
        already holds the video's features (``cached_video_frames``; ``use_video_cache=False`` turns the
        lookup off), the slots keep the pad id and nothing is decoded or written to shared memory."""
        prepared = self.prepare_prompt(conversation, use_cache=kwargs.get("use_video_cache", True))
        ids, pixels, video = prepared.ids, prepared.pixels, prepared.video
        if pixels is None:
            return ids
        save_path = kwargs.get("shm_name_save_path") or os.path.join(
            os.path.dirname(os.path.dirname(os.path.abspath(video))), "shm_name.txt")
        name_code, shape_code = write_pixels_to_shm(pixels, save_path)
        first_slot = ids.index(self.pad_token_id)
        ids[first_slot:first_slot + 2] = [name_code, shape_code]
        return ids

    def generate_position_ids(self, input_ids: np.ndarray) -> Iterable:
        """From the ids alone: vision slots hold the pad id or a (negative) shm code."""
        ids = np.asarray(input_ids)
        return vision_aware_positions((ids == self.pad_token_id) | (ids < 0))


def write_pixels_to_shm(pixels: torch.Tensor | np.ndarray, shm_name_save_path: str) -> tuple[int, int]:
    """Frames as contiguous float32 in a new shared-memory segment -> (name code, shape code).

    Only the framework's shm_utils names (create_shm and the encoders): the segment's name is appended to
    ``shm_name_save_path``, whose owner releases it (``release_shared_memory``) when the request ends.
    """
    if isinstance(pixels, torch.Tensor):
        pixels = pixels.detach().to("cpu", torch.float32).numpy()
    array = np.ascontiguousarray(pixels, dtype=np.float32)
    shape_code = shm_utils.encode_shape_to_int64(list(array.shape))  # validate before creating anything
    shm = shm_utils.create_shm(max(array.nbytes, 1), shm_name_save_path)  # a segment cannot be empty
    try:
        name_code = shm_utils.encode_shm_name_to_int64(shm.name)
        view = np.ndarray(array.shape, dtype=np.float32, buffer=shm.buf)
        view[...] = array
        del view  # it exports shm.buf, which close() refuses while a view lives
    except BaseException:
        shm.close()
        shm.unlink()  # nobody will read a half-written segment: never leave it behind
        raise
    shm.close()
    return name_code, shape_code


def vision_aware_positions(vision_mask: np.ndarray) -> np.ndarray:
    """CogVLM position ids (docs/MODEL.md section 5) from a vision-slot mask.

    The first and last token of every vision run count as language; a language token advances the
    position, and so does the first vision token after a language token; other vision tokens repeat it.
    """
    vision = np.asarray(vision_mask, dtype=bool)
    n = len(vision)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    language = ~vision
    starts = vision & np.concatenate([[True], ~vision[:-1]])
    ends = vision & np.concatenate([~vision[1:], [True]])
    language |= starts | ends
    advance = language.copy()
    advance[1:] |= vision[1:] & language[:-1]
    advance[0] = False
    return np.cumsum(advance, dtype=np.int64)
