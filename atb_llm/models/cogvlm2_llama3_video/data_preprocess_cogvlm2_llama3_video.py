"""Video input of CogVLM2-Video: file checks, frame choice, decoding and the frame transform.

Frame choice and the transform follow docs/MODEL.md section 3 (the reference demo's decord path).
Decoding uses PyAV (over our own file handle, see ``_open_container``) and falls back to decord when PyAV
cannot decode a file. Both backends index frames the same way (packets of the video stream sorted by pts)
and return the same rgb24 pixels, so the chosen frames do not depend on which backend ran. PyAV decodes only
what the chosen frames need: it stops after the last one, seeks to the keyframe before a chosen frame when
that skips enough frames (containers with a sample index) and lets the decoder skip unreferenced frames in
between (measured in benchmarks/bench_preprocess.py).
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

SUPPORTED_VIDEO_EXTENSIONS: tuple[str, ...] = (
    ".mp4", ".avi", ".wmv", ".mkv", ".mov", ".webm", ".flv", ".m4v",
)
MAX_VIDEO_BYTES = 512 * 1024 * 1024
# Decoded frames are width x height x 3 bytes each; 4K (3840 x 2160) fits, 8K does not.
MAX_VIDEO_PIXELS = 3840 * 2160
MAX_ASPECT_RATIO = 16  # resizing the short side to 224 makes the long side 224 x this at most
MAX_VIDEO_SECONDS = 4 * 3600
MAX_VIDEO_PACKETS = 1_000_000  # the index holds one pts per packet
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

def check_video_file(path: str) -> None:
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


_check_file = check_video_file


# --------------------------------------------------------------------------------------------
# Container check: what FFmpeg may open, decided before any decoder sees the file
# --------------------------------------------------------------------------------------------

def sniff_container(head: bytes) -> str | None:
    """The FFmpeg demuxer for a file starting with ``head`` (at least 12 bytes, 512 for MPEG-TS), or None.

    Only self-contained video containers qualify. Text formats that make FFmpeg open other files or URLs
    (HLS playlists, ffconcat lists, SDP, image sequences ...) never match, because each accepted signature
    sits at byte 0, where none of those can start. ``None`` means "not a video we read".
    """
    if len(head) >= 12 and head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
        return "mov"  # ISO BMFF: mp4, mov, m4v, 3gp
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "matroska"  # also webm
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return "avi"
    if head.startswith(bytes.fromhex("3026b2758e66cf11a6d900aa0062ce6c")):
        return "asf"  # wmv
    if head.startswith(b"FLV\x01"):
        return "flv"
    if len(head) >= 377 and head[0] == head[188] == head[376] == 0x47:
        return "mpegts"
    if head.startswith(b"\x00\x00\x01\xba"):
        return "mpeg"  # program stream
    return None


def _demuxer_of(path: str) -> str:
    with open(path, "rb") as file:
        head = file.read(512)
    demuxer = sniff_container(head)
    if demuxer is None:
        raise VideoError(f"cannot open video {path!r}: its content is not a video container we read "
                         "(mp4/mov, mkv/webm, avi, wmv, flv, mpeg-ts/ps); corrupt, truncated or not a video")
    return demuxer


# The mov demuxer can follow "data references" to other files; FFmpeg keeps that off by default, and we say so.
_DEMUXER_OPTIONS = {"mov": {"enable_drefs": "0", "use_absolute_path": "0"}}


def _open_container(file, demuxer: str):
    """PyAV over an already open file object with the demuxer forced: FFmpeg reads this one file through
    our handle, never probes another format, and parses no path or protocol of its own."""
    import av

    return av.open(file, mode="r", format=demuxer, options=dict(_DEMUXER_OPTIONS.get(demuxer, {})))


def check_video_stream(path: str, width: int, height: int, seconds: float | None,
                       max_pixels: int = MAX_VIDEO_PIXELS) -> None:
    """Refuse, before decoding, frames too large for memory and metadata no real clip has."""
    if width < 1 or height < 1:
        raise VideoError(f"video stream of {path!r} declares no frame size ({width}x{height})")
    if width * height > max_pixels:
        raise VideoError(f"video frames of {path!r} are {width}x{height} = {width * height} pixels, more than "
                         f"the limit of {max_pixels}")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise VideoError(f"video frames of {path!r} are {width}x{height}: an aspect ratio above "
                         f"{MAX_ASPECT_RATIO}:1 is not a video frame")
    if seconds is not None and not 0 <= seconds <= MAX_VIDEO_SECONDS:
        raise VideoError(f"video {path!r} declares a duration of {seconds:.0f} s; the limit is "
                         f"{MAX_VIDEO_SECONDS} s")


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

def _iter_decoded(container, stream, needed: set | None = None) -> Iterator:
    """Decoded frames of ``stream`` in presentation order (a seam the tests count through).

    With ``needed`` (packet pts), the decoder skips the frames of other packets that no frame references
    (``skip_frame`` NONREF, set per packet): a skipped frame cannot change any other, so the frames that come
    out are those a full decode gives, fewer of them and sooner."""
    context = stream.codec_context
    for packet in container.demux(stream):
        if needed is not None:
            context.skip_frame = "DEFAULT" if packet.pts is None or packet.pts in needed else "NONREF"
        yield from context.decode(packet)


def _checked_stream(path: str, container, max_pixels: int):
    """The first video stream, after ``check_video_stream`` on what the container declares."""
    if not container.streams.video:
        raise VideoError(f"file has no video stream: {path!r}")
    stream = container.streams.video[0]
    seconds = None
    if stream.duration is not None and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        seconds = container.duration / 1_000_000
    check_video_stream(path, stream.codec_context.width, stream.codec_context.height, seconds, max_pixels)
    return stream


def probe_video(path: str, max_pixels: int = MAX_VIDEO_PIXELS) -> str:
    """Check a video before any decoder reads it: a self-contained container by content, a video stream
    whose frames fit ``max_pixels``. Returns the demuxer name. Raises :class:`VideoError`."""
    import av

    demuxer = _demuxer_of(path)
    try:
        with open(path, "rb") as file, _open_container(file, demuxer) as container:
            _checked_stream(path, container, max_pixels)
    except VideoError:
        raise
    except (av.FFmpegError, EOFError, OSError, ValueError) as exc:
        raise VideoError(f"cannot open video {path!r} (corrupt, truncated or not a video): "
                         f"{_first_line(exc)}") from exc
    return demuxer


@dataclass
class VideoIndex:
    """A video stream's frames as one demux pass sees them, without decoding: packet pts sorted (frame ``i`` is
    the ``i``-th in presentation order), each frame's start time in seconds from the stream start (float32,
    as decord computes it), the average fps, whether the pts are real (else frames are counted in packet
    order), and the presentation indices of the keyframes (random access points)."""

    pts: list[int]
    timestamps: np.ndarray
    fps: float
    pts_valid: bool
    keyframes: list[int]


def scan_video(path: str, demuxer: str, max_pixels: int = MAX_VIDEO_PIXELS) -> VideoIndex:
    """Index the first video stream the way decord builds its index: one frame per packet."""
    with open(path, "rb") as file, _open_container(file, demuxer) as container:
        stream = _checked_stream(path, container, max_pixels)
        pts: list[int | None] = []
        key_pts: list[int] = []
        for packet in container.demux(stream):
            if packet.pts is None and packet.dts is None and packet.size == 0:
                continue  # PyAV's trailing empty flush packet, not a frame
            stamp = packet.pts if packet.pts is not None else packet.dts
            pts.append(stamp)
            if packet.is_keyframe and stamp is not None:
                key_pts.append(stamp)
            if len(pts) > MAX_VIDEO_PACKETS:
                raise VideoError(f"video {path!r} has more than {MAX_VIDEO_PACKETS} frames")
        fps = float(stream.average_rate or stream.guessed_rate or 0.0)
        start = stream.start_time
        time_base = float(stream.time_base) if stream.time_base else 0.0
    if not pts:
        raise VideoError(f"video has no frames: {path!r}")
    if any(p is None for p in pts):
        # No timing in the container: assume a constant rate in packet order (and never seek).
        rate = fps if fps > 0 else 1.0
        return VideoIndex(list(range(len(pts))), np.arange(len(pts), dtype=np.float32) / rate, rate, False, [])
    pts.sort()
    if start is None:
        start = pts[0]
    # decord computes (pts - start) in float32, scales by the time base in double and stores
    # float32; doing the same keeps both backends' timestamps, and so the chosen frames, equal.
    rel = (np.asarray(pts, dtype=np.float32) - np.float32(start)).astype(np.float64)
    first_of = {}
    for i, p in enumerate(pts):
        first_of.setdefault(p, i)
    keyframes = sorted({first_of[p] for p in key_pts if p in first_of})
    return VideoIndex(pts, (rel * time_base).astype(np.float32), fps, True, keyframes)


def _pyav_index(path: str, demuxer: str, max_pixels: int) -> tuple[list[int], np.ndarray, float, bool]:
    index = scan_video(path, demuxer, max_pixels)
    return index.pts, index.timestamps, index.fps, index.pts_valid


# Containers whose seeks land exactly on the keyframe asked for (they carry a sample index); the others
# (MPEG-TS/PS, FLV, ASF) are decoded from the start.
SEEKABLE_DEMUXERS = ("mov", "matroska", "avi")
# A seek pays when it skips more frames than this: after one, the decoder's frame threads refill before the
# first frame comes out (benchmarks/bench_preprocess.py measures the trade-off on 720p H.264).
SEEK_MIN_SKIP = 12


def plan_decode(wanted: Sequence[int], keyframes: Sequence[int], min_skip: int = SEEK_MIN_SKIP
                ) -> list[tuple[int | None, list[int]]]:
    """The frames to decode, as segments ``(keyframe to seek to, or None to go on decoding, frames wanted)``.

    Decoding goes forward from the start; before a wanted frame, it seeks to the last keyframe at or before it
    when that skips more than ``min_skip`` frames the decoder would otherwise run through."""
    segments: list[tuple[int | None, list[int]]] = []
    position = 0  # the frame the decoder gives next when it goes on
    for frame in sorted(set(wanted)):
        at = bisect.bisect_right(keyframes, frame) - 1
        key = keyframes[at] if at >= 0 else None
        if key is not None and key - position > min_skip:
            segments.append((key, [frame]))
        elif segments:
            segments[-1][1].append(frame)
        else:
            segments.append((None, [frame]))
        position = frame + 1
    return segments


class _SeekMissed(Exception):
    """A seek did not land on the keyframe the index promised: decode from the start instead."""


def _decode_chosen(path: str, demuxer: str, index: VideoIndex, ids: Sequence[int], max_pixels: int,
                   seek: bool) -> dict[int, np.ndarray]:
    """Decode the frames ``ids`` (presentation indices) following :func:`plan_decode`. In between, the frames
    others reference are decoded but never converted, the rest skipped."""
    index_of_pts: dict[int, int] = {}
    if index.pts_valid:
        for i, p in enumerate(index.pts):
            index_of_pts.setdefault(p, i)  # first frame wins on duplicate pts
    plan = plan_decode(ids, index.keyframes if seek and index.pts_valid else [])
    needed = {index.pts[i] for i in ids} if index.pts_valid else None
    got: dict[int, np.ndarray] = {}
    with open(path, "rb") as file, _open_container(file, demuxer) as container:
        stream = container.streams.video[0]
        # PyAV's default slice threads: frame threads (AUTO/FRAME) measured slower with frames skipped, and no
        # faster on single-slice streams (benchmarks/bench_preprocess.py's files, 2 cores).
        stream.thread_type = "SLICE"
        frames: Iterator | None = None
        position = 0
        for seek_to, targets in plan:
            after_seek = seek_to is not None
            if after_seek:
                container.seek(index.pts[seek_to], stream=stream, backward=True, any_frame=False)
                frames, position = None, seek_to
            if frames is None:
                frames = iter(_iter_decoded(container, stream, needed))
            wanted, last = set(targets), targets[-1]
            for frame in frames:
                # Map by pts when possible (robust to a decoder dropping undecodable leading frames);
                # otherwise count frames in presentation order.
                at = index_of_pts.get(frame.pts, position)
                if after_seek:
                    if at > seek_to:
                        raise _SeekMissed
                    if at < seek_to:
                        continue  # a seek that landed earlier (or leading frames): decode on
                    after_seek = False
                position = at + 1
                if at in wanted and at not in got:
                    if frame.width * frame.height > max_pixels:  # a stream may change size midway
                        raise VideoError(f"a frame of {path!r} is {frame.width}x{frame.height}, more than "
                                         f"{max_pixels} pixels")
                    got[at] = _upright(frame.to_ndarray(format="rgb24"), getattr(frame, "rotation", 0))
                if at >= last:
                    break  # never decode past the last frame of the segment
    return got


def _load_with_pyav(path: str, template: str, num_frames: int, demuxer: str, max_pixels: int) -> np.ndarray:
    """[T, H, W, 3] uint8 via PyAV: only the chosen frames are converted, only up to the last one decoded,
    seeking past long stretches between them to the keyframe before the next (see :func:`plan_decode`)."""
    import av

    try:
        index = scan_video(path, demuxer, max_pixels)
        ids = choose_frame_ids(index.timestamps, _usable_fps(index.fps, index.timestamps), len(index.pts),
                               template, num_frames)
        try:
            got = _decode_chosen(path, demuxer, index, ids, max_pixels, seek=demuxer in SEEKABLE_DEMUXERS)
        except _SeekMissed:
            logger.debug("a seek in %s missed its keyframe: decoding from the start", path)
            got = _decode_chosen(path, demuxer, index, ids, max_pixels, seek=False)
    except VideoError:
        raise
    except av.FFmpegError as exc:
        raise VideoError(f"cannot open or decode video {path!r} (corrupt, truncated or not a "
                         f"video): {_first_line(exc)}") from exc
    except (EOFError, OSError, IndexError, KeyError, ValueError) as exc:
        raise VideoError(f"cannot read video {path!r}: {_first_line(exc)}") from exc

    missing = sorted(set(ids) - got.keys())
    if missing:
        if not got:
            raise VideoError(f"video has no decodable frames: {path!r}")
        raise VideoError(
            f"video is corrupt or truncated: {path!r} indexes {len(index.pts)} frames but frames "
            f"{missing[:5]}{'...' if len(missing) > 5 else ''} could not be decoded"
        )
    shapes = {got[i].shape for i in ids}
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
    max_pixels: int = MAX_VIDEO_PIXELS,
) -> torch.Tensor:
    """Decode the chosen frames of ``path`` as a uint8 ``[C, T, H, W]`` tensor.

    First :func:`probe_video`: the file must be a self-contained container by its content, with frames of
    at most ``max_pixels``. ``backend=None`` decodes with PyAV (measured faster than decord on long and short
    keyframe intervals alike, with the same pixels: see :func:`_load_with_pyav`) and tries decord when PyAV
    fails; ``"decord"`` / ``"pyav"`` force one. Unusable input raises :class:`VideoError`.
    """
    _check_template(template)
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if backend is not None and backend not in _BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; expected None or one of {_BACKENDS}")
    _check_file(path)
    path = os.fspath(path)
    # decord probes formats itself (an HLS playlist would make it open other files): it only ever sees a
    # file this check has proven to be a self-contained container.
    try:
        demuxer = probe_video(path, max_pixels)
    except ImportError as exc:
        raise RuntimeError("PyAV (av) is required to check videos before decoding") from exc

    frames: np.ndarray | None = None
    failure: VideoError | None = None
    if backend in (None, "pyav"):
        try:
            frames = _load_with_pyav(path, template, num_frames, demuxer, max_pixels)
        except VideoError as exc:
            if backend == "pyav":
                raise
            failure = exc  # its words are the clearer: raised if decord cannot read the file either
            logger.debug("PyAV failed, trying decord: %s", exc)
    if frames is None:
        try:
            frames = _load_with_decord(path, template, num_frames)
        except ImportError as exc:
            if failure is not None:
                raise failure from None
            raise RuntimeError(f"video backend 'decord' requested: {exc}") from exc
        except VideoError:
            if failure is not None:
                raise failure from None
            raise
    # [T, H, W, C] -> [C, T, H, W], the layout the reference transform expects.
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2)


def _read_band(size_in: int, size_out: int, start: int, length: int) -> tuple[int, int]:
    """Input pixels [lo, hi) the bilinear resize (half-pixel centres, no antialias) reads for output pixels
    ``start .. start + length - 1``, with two pixels to spare on each side."""
    scale = size_in / size_out
    lo = math.floor((start + 0.5) * scale - 0.5) - 2
    hi = math.floor((start + length - 0.5) * scale - 0.5) + 4
    return max(lo, 0), min(hi, size_in)


def transform_frames(clip: torch.Tensor, image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """uint8 ``[C, T, H, W]`` -> float32 ``[T, 3, image_size, image_size]`` model input.

    ``/255``, per-channel normalise, bilinear resize of the short side to ``image_size``, centre
    crop. Normalising before resizing is the reference order (it changes float rounding). A uint8 channel
    has 256 values, so normalising is a lookup in a table computed with those same float32 operations (the
    same values, one pass instead of four), and only over the pixels the crop's resize reads.
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

    mean = torch.tensor(IMAGE_MEAN, dtype=torch.float32).view(3, 1)
    std = torch.tensor(IMAGE_STD, dtype=torch.float32).view(3, 1)
    table = ((torch.arange(256, dtype=torch.float32).view(1, 256) / 255.0 - mean) / std).numpy()  # [3, 256]
    rows = _read_band(height, new_h, top, image_size)
    cols = _read_band(width, new_w, left, image_size)
    pixels = clip.numpy()
    # One frame at a time: a float copy of a whole full-HD clip would be ~600 MB. Pixels the crop never reads
    # stay 0: the resize of the kept outputs does not touch them.
    frame = np.zeros((3, height, width), dtype=np.float32)
    out = torch.empty(frames, 3, image_size, image_size, dtype=torch.float32)
    for t in range(frames):
        for channel in range(3):
            frame[channel, rows[0]:rows[1], cols[0]:cols[1]] = table[channel][
                pixels[channel, t, rows[0]:rows[1], cols[0]:cols[1]]]
        resized = F.interpolate(torch.from_numpy(frame)[None], size=(new_h, new_w), mode="bilinear",
                                align_corners=False, antialias=False)[0]
        out[t] = resized[:, top:top + image_size, left:left + image_size]
    return out


def load_video(
    path: str,
    template: str = "chat",
    num_frames: int = NUM_FRAMES,
    backend: str | None = None,
    max_pixels: int = MAX_VIDEO_PIXELS,
) -> torch.Tensor:
    """Model-ready float32 ``[T, 3, 224, 224]`` frames of ``path``."""
    return transform_frames(load_video_frames(path, template, num_frames, backend, max_pixels))


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
