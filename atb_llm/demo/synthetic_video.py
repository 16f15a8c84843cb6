"""Deterministic synthetic videos for tests and demos (no real footage needed).

Every frame carries its own index as a 4x4 grid of dark/bright cells (16 bits, most significant
bit top-left), so a decoded frame can be mapped back to the index it was encoded from even after
lossy compression. A moving gradient and a seed-dependent tint make consecutive frames differ
in more than the index cells.
"""

from __future__ import annotations

import argparse

import av
import numpy as np

GRID = 4  # cells per side; 16 bits encode up to 65535 frames
_DARK, _BRIGHT = 48, 208  # far apart so the bits survive yuv420p and x264 quantisation


def synthetic_frame(index: int, size: tuple[int, int] = (320, 240), seed: int = 0) -> np.ndarray:
    """RGB uint8 frame [H, W, 3] for frame ``index`` of a ``size`` = (width, height) video."""
    width, height = size
    ys = (np.arange(height) * GRID) // height
    xs = (np.arange(width) * GRID) // width
    cell = ys[:, None] * GRID + xs[None, :]  # 0..15, row-major, top-left first
    bits = (index >> (GRID * GRID - 1 - cell)) & 1
    base = np.where(bits == 1, _BRIGHT, _DARK).astype(np.int16)

    # Moving diagonal gradient (green) and a static tint chosen by the seed (blue), both small
    # enough (+-24) to never flip a cell across the dark/bright midpoint.
    yy, xx = np.mgrid[0:height, 0:width]
    gradient = ((xx + yy + 3 * index) % 48) - 24
    tint = np.random.default_rng(seed).integers(-16, 17, size=(height, width))

    frame = np.empty((height, width, 3), dtype=np.int16)
    frame[..., 0] = base
    frame[..., 1] = base + gradient
    frame[..., 2] = base + tint
    return np.clip(frame, 0, 255).astype(np.uint8)


def read_frame_index(frame: np.ndarray) -> int:
    """Recover the index encoded by :func:`synthetic_frame` from a decoded RGB frame [H, W, 3]."""
    height, width = frame.shape[:2]
    gray = np.asarray(frame, dtype=np.float32).mean(axis=2)
    index = 0
    for cell in range(GRID * GRID):
        row, col = divmod(cell, GRID)
        # Average the middle half of each cell: edges blur into neighbours after compression.
        y0, y1 = row * height // GRID, (row + 1) * height // GRID
        x0, x1 = col * width // GRID, (col + 1) * width // GRID
        dy, dx = (y1 - y0) // 4, (x1 - x0) // 4
        level = gray[y0 + dy:y1 - dy, x0 + dx:x1 - dx].mean()
        index = (index << 1) | int(level > (_DARK + _BRIGHT) / 2)
    return index


def write_synthetic_video(
    path: str,
    seconds: float,
    fps: int,
    size: tuple[int, int] = (320, 240),
    codec: str = "libx264",
    seed: int = 0,
    gop: int | None = None,
) -> str:
    """Write a ``round(seconds * fps)``-frame yuv420p video at ``fps`` to ``path``; return ``path``.

    ``size`` is (width, height) and must be even for yuv420p. The container follows the file
    extension (.mp4, .avi, .mkv, ...); ``codec`` is any PyAV video encoder (libx264, mpeg4, ...). ``gop``
    fixes the keyframe interval in frames (default: the encoder's, 250 for libx264).
    """
    width, height = size
    if width % 2 or height % 2:
        raise ValueError(f"size must be even for yuv420p, got {size}")
    num_frames = round(seconds * fps)
    with av.open(path, mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            # Fast and small; still a normal H.264 stream with B-frames and a regular GOP.
            stream.options = {"preset": "veryfast", "crf": "18"}
        if gop:
            stream.options = {**stream.options, "g": str(gop), "keyint_min": str(gop), "sc_threshold": "0"}
        for index in range(num_frames):
            frame = av.VideoFrame.from_ndarray(synthetic_frame(index, size, seed), format="rgb24")
            frame.pts = index
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():  # flush delayed frames
            container.mux(packet)
    return path


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--fps", type=int, default=10)
    parser.add_argument("--size", type=int, nargs=2, default=(320, 240), metavar=("W", "H"))
    parser.add_argument("--codec", default="libx264")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_synthetic_video(args.path, args.seconds, args.fps, tuple(args.size), args.codec,
                                args.seed))


if __name__ == "__main__":
    _main()
