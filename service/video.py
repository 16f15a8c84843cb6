"""Per-request video controls: how many frames (``num_frames``) and at what rate (``fps``) a request's video is
sampled, and the timestamps of the frames used (``return_timestamps``).

Without controls the checkpoint's frame rule applies (``choose_frame_ids``: for chat, one frame per second,
at most 24) and decoding is the model's own. With controls the frames are chosen here, on the same index of
the video (one demux pass, presentation timestamps) and decoded by the same decoder:

- ``fps`` F: targets at 0, 1/F, 2/F, ... up to the last frame's start; more than the frame budget
  (``num_frames``, else 24) are thinned evenly to that budget;
- ``num_frames`` N alone: N targets spread evenly from the first frame's start to the last frame's start;
- each target takes the frame whose start time is nearest (the first on ties); a frame is used once.

The vision-feature and prefix caches key a video by its content, the frame rule and these controls.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from atb_llm.models.cogvlm2_llama3_video import data_preprocess_cogvlm2_llama3_video as dp
from service.errors import invalid

MAX_FRAMES = dp.NUM_FRAMES  # the vision tower's budget per video (24)
MAX_FPS = 60.0
CONTROL_KEYS = ("num_frames", "fps")


@dataclass(frozen=True)
class VideoOptions:
    num_frames: int | None = None
    fps: float | None = None
    return_timestamps: bool = False

    @property
    def custom(self) -> bool:
        """Whether the frames are chosen by these controls rather than the checkpoint's rule."""
        return self.num_frames is not None or self.fps is not None

    def key_suffix(self) -> str:
        """What sets these frames apart in cache keys ("" for the checkpoint's rule)."""
        return f"|frames={self.num_frames}|fps={self.fps!r}" if self.custom else ""


def parse_controls(sources: list[tuple[str, object]], return_timestamps: object = None) -> VideoOptions | None:
    """The controls of a request from ``(name, value)`` sources (e.g. ``("mm_processor_kwargs", {...})``): each
    an object with only ``num_frames`` and / or ``fps``. Sources that set the same control must agree.
    Raises a 422 with a clear message for anything else."""
    found: dict[str, object] = {}
    for name, value in sources:
        if value is None:
            continue
        if not isinstance(value, dict):
            raise invalid(f"{name} must be an object")
        unknown = sorted(set(value) - set(CONTROL_KEYS))
        if unknown:
            raise invalid(f"{name} supports only {' and '.join(CONTROL_KEYS)} for this model, got {unknown}")
        for key, item in value.items():
            if item is None:
                continue
            if key in found and found[key] != item:
                raise invalid(f"{key} is given twice with different values ({found[key]!r} and {item!r})")
            found[key] = item
    num_frames, fps = found.get("num_frames"), found.get("fps")
    if num_frames is not None and (isinstance(num_frames, bool) or not isinstance(num_frames, int)
                                   or not 1 <= num_frames <= MAX_FRAMES):
        raise invalid(f"Parameter num_frames must be an integer in [1, {MAX_FRAMES}], got {num_frames!r}")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps)
                            or not 0 < fps <= MAX_FPS):
        raise invalid(f"Parameter fps must be a number in (0, {MAX_FPS:g}], got {fps!r}")
    if return_timestamps is not None and not isinstance(return_timestamps, bool):
        raise invalid("return_timestamps must be boolean type.")
    if num_frames is None and fps is None and not return_timestamps:
        return None
    return VideoOptions(num_frames, None if fps is None else float(fps), bool(return_timestamps))


def choose_frames(timestamps: np.ndarray, options: VideoOptions) -> list[int]:
    """The presentation indices of the frames to use (see the module's docstring), in time order."""
    ts = np.asarray(timestamps, dtype=np.float64)
    if len(ts) == 0:
        raise dp.VideoError("video has no frame timestamps")
    first, last = float(ts.min()), float(ts.max())
    if options.fps is not None:
        count = math.floor((last - first) * options.fps + 1e-9) + 1
        targets = first + np.arange(count, dtype=np.float64) / options.fps
        budget = options.num_frames or MAX_FRAMES
        if len(targets) > budget:
            targets = targets[np.linspace(0, len(targets) - 1, budget).round().astype(int)]
    else:
        count = options.num_frames or MAX_FRAMES
        targets = np.linspace(first, last, count) if count > 1 else np.array([first])
    chosen: list[int] = []
    for target in targets:
        index = int(np.abs(ts - target).argmin())
        if index not in chosen:
            chosen.append(index)
    return sorted(chosen, key=lambda i: (ts[i], i))


def _index(path: str, max_pixels: int) -> tuple[str, dp.VideoIndex]:
    dp.check_video_file(path)
    demuxer = dp.probe_video(path, max_pixels)
    try:
        return demuxer, dp.scan_video(path, demuxer, max_pixels)
    except dp.VideoError:
        raise
    except Exception as exc:  # the decoder's own errors (av.FFmpegError, EOFError, ...): the file is unusable
        raise dp.VideoError(f"cannot read video {path!r}: {dp._first_line(exc)}") from exc


def frame_ids(path: str, template: str, options: VideoOptions | None, max_pixels: int) -> tuple[dp.VideoIndex, list]:
    """The video's index and the frames a request uses: by ``options`` when custom, else the checkpoint's rule."""
    _, index = _index(path, max_pixels)
    if options is not None and options.custom:
        return index, choose_frames(index.timestamps, options)
    ids = dp.choose_frame_ids(index.timestamps, dp._usable_fps(index.fps, index.timestamps), len(index.pts),
                              template, dp.NUM_FRAMES)
    return index, list(ids)


def frame_timestamps(path: str, template: str, options: VideoOptions | None, max_pixels: int) -> list[float]:
    """Start times in seconds of the frames a request uses (rounded to the microsecond)."""
    index, ids = frame_ids(path, template, options, max_pixels)
    return [round(float(index.timestamps[i]), 6) for i in ids]


def load_chosen(path: str, options: VideoOptions, max_pixels: int) -> torch.Tensor:
    """Model-ready ``[T, 3, 224, 224]`` frames chosen by ``options``."""
    demuxer, index = _index(path, max_pixels)
    ids = choose_frames(index.timestamps, options)
    try:
        try:
            got = dp._decode_chosen(path, demuxer, index, ids, max_pixels, seek=demuxer in dp.SEEKABLE_DEMUXERS)
        except dp._SeekMissed:
            got = dp._decode_chosen(path, demuxer, index, ids, max_pixels, seek=False)
    except dp.VideoError:
        raise
    except Exception as exc:
        raise dp.VideoError(f"cannot open or decode video {path!r} (corrupt, truncated or not a video): "
                            f"{dp._first_line(exc)}") from exc
    missing = [i for i in ids if i not in got]
    if missing:
        raise dp.VideoError(f"video is corrupt or truncated: {path!r}: frames {missing[:5]} could not be decoded")
    if len({got[i].shape for i in ids}) != 1:
        raise dp.VideoError(f"video changes resolution between frames: {path!r}")
    frames = np.stack([got[i] for i in ids])
    return dp.transform_frames(torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2))


class RequestVideo:
    """The controls of the request a tokenizer thread is working on (thread-local), for the input builder's
    ``load_video`` and the vision-cache lookup, which know only the video's path."""

    def __init__(self):
        self._local = threading.local()

    @property
    def options(self) -> VideoOptions | None:
        return getattr(self._local, "options", None)

    def run(self, options: VideoOptions | None, fn: Callable, *args):
        self._local.options = options
        try:
            return fn(*args)
        finally:
            self._local.options = None
