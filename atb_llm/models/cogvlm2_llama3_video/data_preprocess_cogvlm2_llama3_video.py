"""Video input of CogVLM2-Video: file checks, frame choice, decoding and the frame transform.

Frame choice and the transform follow docs/MODEL.md section 3 (the reference demo's decord path).
Decoding tries decord first and falls back to PyAV (decord's bundled FFmpeg cannot open e.g.
AV1). Both backends index frames the same way (packets of the video stream sorted by pts) and
return the same rgb24 pixels, so the chosen frames do not depend on which backend ran.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

SUPPORTED_VIDEO_EXTENSIONS: tuple[str, ...] = (
    ".mp4", ".avi", ".wmv", ".mkv", ".mov", ".webm", ".flv", ".m4v",
)
MAX_VIDEO_BYTES = 512 * 1024 * 1024
NUM_FRAMES = 24
IMAGE_SIZE = 224

IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

_TEMPLATES = ("chat", "vqa", "base")
_BACKENDS = ("decord", "pyav")
_BASE_MAX_SECONDS = 60  # the base strategy only samples from the first minute

logger = logging.getLogger(__name__)


class VideoError(ValueError):
    """A video file that cannot be used as model input; the message names the file."""


# --------------------------------------------------------------------------------------------
# Frame choice
# --------------------------------------------------------------------------------------------

def choose_frame_ids(
    timestamps: Sequence[float],
    avg_fps: float,
    total_frames: int,
    template: str,
    num_frames: int = NUM_FRAMES,
) -> list[int]:
    """Indices of the frames to feed the model (docs/MODEL.md section 3).

    chat / vqa: one frame per whole second ``s`` in ``range(round(max(timestamps)) + 1)``, the one
    whose start time is closest to ``s`` (first on ties), at most ``num_frames`` of them.
    base: ``linspace(0, end - 1, num_frames)`` truncated to int, ``end = min(total, 60 * fps)``.
    """
    _check_template(template)
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if total_frames < 1:
        raise VideoError("video has no frames")

    if template == "base":
        end = min(total_frames, int(_BASE_MAX_SECONDS * avg_fps))
        if end < 1:  # unknown / zero fps: sample the whole clip rather than fail
            end = total_frames
        return np.linspace(0, end - 1, num_frames).astype(int).tolist()

    if len(timestamps) == 0:
        raise VideoError("video has no frame timestamps")
    # float64 keeps |t - s| exact for float32 timestamps, so ties resolve to the first frame.
    ts = np.asarray(timestamps, dtype=np.float64)
    max_second = round(float(ts.max())) + 1
    # max(1, ...): only negative timestamps could give 0 seconds; still return one frame.
    # One argmin per second keeps memory at O(frames) even for hour-long 60 fps files.
    return [int(np.abs(ts - s).argmin()) for s in range(max(1, min(max_second, num_frames)))]


def _check_template(template: str) -> None:
    if template not in _TEMPLATES:
        raise VideoError(f"unknown video template {template!r}; expected one of {_TEMPLATES}")


# --------------------------------------------------------------------------------------------
# File checks
# --------------------------------------------------------------------------------------------

def _check_file(path: str) -> None:
    """Reject unusable paths before any decoder touches them (cheap, clear messages)."""
    if not isinstance(path, (str, os.PathLike)):
        raise VideoError(f"video path must be a string, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise VideoError(f"video file does not exist: {path!r}")
    if not os.path.isfile(path):
        raise VideoError(f"video path is not a regular file: {path!r}")
    ext = os.path.splitext(path)[1].lower()
    if ext not in SUPPORTED_VIDEO_EXTENSIONS:
        raise VideoError(
            f"unsupported video extension {ext or '(none)'!r} for {path!r}; "
            f"supported: {', '.join(SUPPORTED_VIDEO_EXTENSIONS)}"
        )
    size = os.path.getsize(path)
    if size == 0:
        raise VideoError(f"video file is empty (0 bytes): {path!r}")
    if size > MAX_VIDEO_BYTES:
        raise VideoError(
            f"video file is too large: {path!r} has {size} bytes, limit is {MAX_VIDEO_BYTES}"
        )
    if not os.access(path, os.R_OK):
        raise VideoError(f"video file is not readable: {path!r}")


# --------------------------------------------------------------------------------------------
# decord backend
# --------------------------------------------------------------------------------------------

def _load_with_decord(path: str, template: str, num_frames: int) -> np.ndarray:
    """[T, H, W, 3] uint8 via decord (the reference demo's decoder)."""
    # Lazy import: the module must import where decord is not installed (e.g. aarch64 wheels).
    try:
        import decord
    except Exception as exc:  # missing, or a broken build (ABI / shared-library errors)
        raise ImportError(f"decord is unavailable: {exc}") from exc

    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    except Exception as exc:  # decord raises RuntimeError / DECORDError with FFmpeg's text
        raise VideoError(f"decord cannot open video {path!r}: {_first_line(exc)}") from exc
    try:
        total = len(reader)
        if total < 1:
            raise VideoError(f"video has no frames: {path!r}")
        timestamps = reader.get_frame_timestamp(range(total))[:, 0]
        ids = choose_frame_ids(timestamps, _usable_fps(reader.get_avg_fps(), timestamps),
                               total, template, num_frames)
        batch = reader.get_batch(ids)
    except VideoError:
        raise
    except Exception as exc:
        raise VideoError(f"decord cannot decode video {path!r}: {_first_line(exc)}") from exc
    finally:
        del reader
    # get_batch gives a decord NDArray, or a torch tensor if someone set the torch bridge.
    frames = batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)
    if frames.ndim != 4 or frames.shape[0] != len(ids) or frames.shape[-1] != 3:
        raise VideoError(f"decord returned unexpected frames {frames.shape} for {path!r}")
    return frames


# --------------------------------------------------------------------------------------------
# PyAV backend
# --------------------------------------------------------------------------------------------

def _iter_decoded(container, stream) -> Iterator:
    """Decoded frames of ``stream`` in presentation order (a seam the tests count through)."""
    yield from container.decode(stream)


def _pyav_index(path: str) -> tuple[list[int], np.ndarray, float, bool]:
    """Frame index of the first video stream, like decord builds it: one frame per packet.

    Returns the packets' pts sorted (frame ``i`` is the ``i``-th in presentation order), each
    frame's start time in seconds from the stream start (float32), the average fps, and whether
    the pts are real (else frames are counted in packet order). Demuxing reads packets without
    decoding them, so indexing even a long file is cheap.
    """
    import av

    with av.open(path) as container:
        if not container.streams.video:
            raise VideoError(f"file has no video stream: {path!r}")
        stream = container.streams.video[0]
        pts: list[int | None] = []
        for packet in container.demux(stream):
            if packet.pts is None and packet.dts is None and packet.size == 0:
                continue  # PyAV's trailing empty flush packet, not a frame
            pts.append(packet.pts if packet.pts is not None else packet.dts)
        fps = float(stream.average_rate or stream.guessed_rate or 0.0)
        start = stream.start_time
        time_base = float(stream.time_base) if stream.time_base else 0.0
    if not pts:
        raise VideoError(f"video has no frames: {path!r}")
    if any(p is None for p in pts):
        # No timing in the container: assume a constant rate in packet order.
        rate = fps if fps > 0 else 1.0
        return list(range(len(pts))), np.arange(len(pts), dtype=np.float32) / rate, rate, False
    pts.sort()
    if start is None:
        start = pts[0]
    # decord computes (pts - start) in float32, scales by the time base in double and stores
    # float32; doing the same keeps both backends' timestamps, and so the chosen frames, equal.
    rel = (np.asarray(pts, dtype=np.float32) - np.float32(start)).astype(np.float64)
    return pts, (rel * time_base).astype(np.float32), fps, True


def _load_with_pyav(path: str, template: str, num_frames: int) -> np.ndarray:
    """[T, H, W, 3] uint8 via PyAV, decoding only up to the last chosen frame."""
    import av

    try:
        pts, timestamps, fps, pts_valid = _pyav_index(path)
        ids = choose_frame_ids(timestamps, _usable_fps(fps, timestamps), len(pts), template,
                               num_frames)
        wanted, last = set(ids), max(ids)
        index_of_pts: dict[int, int] = {}
        if pts_valid:
            for i, p in enumerate(pts):
                index_of_pts.setdefault(p, i)  # first frame wins on duplicate pts
        got: dict[int, np.ndarray] = {}
        with av.open(path) as container:
            stream = container.streams.video[0]
            position = 0
            for frame in _iter_decoded(container, stream):
                # Map by pts when possible (robust to a decoder dropping undecodable leading
                # frames); otherwise count frames in presentation order.
                index = index_of_pts.get(frame.pts, position)
                position = index + 1
                if index in wanted and index not in got:
                    rgb = frame.to_ndarray(format="rgb24")
                    got[index] = _upright(rgb, getattr(frame, "rotation", 0))
                if index >= last or len(got) == len(wanted):
                    break  # never decode past the last frame we need
    except VideoError:
        raise
    except av.FFmpegError as exc:
        raise VideoError(f"cannot open or decode video {path!r} (corrupt, truncated or not a "
                         f"video): {_first_line(exc)}") from exc
    except (EOFError, OSError, IndexError, KeyError, ValueError) as exc:
        raise VideoError(f"cannot read video {path!r}: {_first_line(exc)}") from exc

    missing = sorted(wanted - got.keys())
    if missing:
        if not got:
            raise VideoError(f"video has no decodable frames: {path!r}")
        raise VideoError(
            f"video is corrupt or truncated: {path!r} indexes {len(pts)} frames but frames "
            f"{missing[:5]}{'...' if len(missing) > 5 else ''} could not be decoded"
        )
    shapes = {got[i].shape for i in wanted}
    if len(shapes) != 1:
        raise VideoError(f"video changes resolution between frames {sorted(shapes)}: {path!r}")
    return np.stack([got[i] for i in ids])


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------

def load_video_frames(
    path: str,
    template: str = "chat",
    num_frames: int = NUM_FRAMES,
    backend: str | None = None,
) -> torch.Tensor:
    """Decode the chosen frames of ``path`` as a uint8 ``[C, T, H, W]`` tensor.

    ``backend=None`` tries decord and falls back to PyAV when decord is missing or fails;
    ``"decord"`` / ``"pyav"`` force one. Unusable input raises :class:`VideoError`.
    """
    _check_template(template)
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if backend is not None and backend not in _BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; expected None or one of {_BACKENDS}")
    _check_file(path)
    path = os.fspath(path)

    frames: np.ndarray | None = None
    if backend in (None, "decord"):
        try:
            frames = _load_with_decord(path, template, num_frames)
        except ImportError as exc:
            if backend == "decord":
                raise RuntimeError(f"video backend 'decord' requested: {exc}") from exc
        except VideoError as exc:
            if backend == "decord":
                raise
            # Fall through: PyAV opens more codecs (AV1, ...) and words its errors better.
            logger.debug("decord failed, falling back to PyAV: %s", exc)
    if frames is None:
        try:
            frames = _load_with_pyav(path, template, num_frames)
        except ImportError as exc:
            raise RuntimeError("no video backend: install decord or av (PyAV)") from exc
    # [T, H, W, C] -> [C, T, H, W], the layout the reference transform expects.
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2)


def transform_frames(clip: torch.Tensor, image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """uint8 ``[C, T, H, W]`` -> float32 ``[T, 3, image_size, image_size]`` model input.

    ``/255``, per-channel normalise, bilinear resize of the short side to ``image_size``, centre
    crop. Normalising before resizing is the reference order (it changes float rounding).
    """
    if clip.ndim != 4 or clip.shape[0] != 3:
        raise ValueError(f"expected a [3, T, H, W] clip, got shape {tuple(clip.shape)}")
    if clip.dtype != torch.uint8:
        raise ValueError(f"expected a uint8 clip, got {clip.dtype}")
    _, frames, height, width = clip.shape
    if height < 1 or width < 1 or frames < 1:
        raise ValueError(f"empty clip of shape {tuple(clip.shape)}")
    if width < height:
        new_h, new_w = math.floor(height / width * image_size), image_size
    else:
        new_h, new_w = image_size, math.floor(width / height * image_size)
    top = round((new_h - image_size) / 2.0)
    left = round((new_w - image_size) / 2.0)

    mean = torch.tensor(IMAGE_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGE_STD, dtype=torch.float32).view(3, 1, 1)
    out = torch.empty(frames, 3, image_size, image_size, dtype=torch.float32)
    # One frame at a time: a float copy of a whole full-HD clip would be ~600 MB.
    for t in range(frames):
        frame = clip[:, t].to(torch.float32) / 255.0
        frame = (frame - mean) / std
        frame = F.interpolate(frame[None], size=(new_h, new_w), mode="bilinear",
                              align_corners=False, antialias=False)[0]
        out[t] = frame[:, top:top + image_size, left:left + image_size]
    return out


def load_video(
    path: str,
    template: str = "chat",
    num_frames: int = NUM_FRAMES,
    backend: str | None = None,
) -> torch.Tensor:
    """Model-ready float32 ``[T, 3, 224, 224]`` frames of ``path``."""
    return transform_frames(load_video_frames(path, template, num_frames, backend))


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def _usable_fps(fps: float, timestamps: np.ndarray) -> float:
    """The container's average fps, or one estimated from the timestamps if it is missing."""
    if fps and math.isfinite(fps) and fps > 0:
        return float(fps)
    span = float(timestamps[-1] - timestamps[0]) if len(timestamps) > 1 else 0.0
    return (len(timestamps) - 1) / span if span > 0 else 0.0


def _upright(rgb: np.ndarray, rotation: int) -> np.ndarray:
    """Apply the stream's display rotation (counter-clockwise degrees), as decord does."""
    quarter_turns = round(rotation / 90) % 4 if rotation else 0
    return np.ascontiguousarray(np.rot90(rgb, quarter_turns)) if quarter_turns else rgb


def _first_line(exc: BaseException) -> str:
    """First line of an exception's text, without decord's ``[hh:mm:ss] file.cc:N:`` prefix."""
    text = str(exc).strip() or type(exc).__name__
    line = re.sub(r"^\[[0-9:]+\] \S+:\d+: ", "", text.splitlines()[0])
    return line[:300]
