"""Video preprocessing (chosen frames -> model pixels) against a naive decode-every-frame loop.

Makes (once, cached) 60 s 720p H.264 files at 30 fps: with libx264's default keyframe interval (250 frames)
and with one keyframe a second (30), as phones and streaming encoders write them. For each file and frame rule
(chat: one frame a second, up to 24; base: 24 over the first minute) it times, side by side in one process:

- naive: ``av.open`` and decode every frame in order, converting the chosen ones to RGB, then the transform;
- ours: ``load_video`` (probe, index, decode only what the chosen frames need, transform);
- decord: ``load_video(..., backend="decord")``, the reference demo's decoder, for comparison.

and checks that the three give identical pixels. Prints seconds (best of ``--repeats``, interleaved: the
machine is shared) and ours / naive.

    .venv/bin/python -m benchmarks.bench_preprocess [--seconds 60] [--repeats 3]
"""
import argparse
import time

import av
import numpy as np
import torch

from atb_llm.models.cogvlm2_llama3_video import data_preprocess_cogvlm2_llama3_video as vp
from benchmarks.common import make_video


def naive_load(path: str, template: str) -> torch.Tensor:
    """Decode every frame, keep the chosen ones (same frame rule), transform."""
    index = vp.scan_video(path, vp.probe_video(path))
    ids = vp.choose_frame_ids(index.timestamps, index.fps, len(index.pts), template)
    wanted = set(ids)
    kept = {}
    with av.open(path) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                kept[i] = frame.to_ndarray(format="rgb24")
    clip = torch.from_numpy(np.stack([kept[i] for i in ids])).permute(3, 0, 1, 2)
    return vp.transform_frames(clip)


def timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gops", type=int, nargs="+", default=[0, 30], help="keyframe intervals (0: x264's)")
    args = parser.parse_args()
    print(f"torch threads {torch.get_num_threads()}; {args.seconds} s, 1280x720, 30 fps, H.264 (mp4)")
    print(f"{'keyframes':>12} {'rule':>5} {'naive s':>8} {'ours s':>7} {'decord s':>9} {'ours/naive':>11} "
          f"{'identical':>10}")
    for gop in args.gops:
        path = make_video(args.seconds, gop=gop or None)
        label = f"every {gop}" if gop else "x264 (250)"
        for template in ("chat", "base"):
            best = {"naive": float("inf"), "ours": float("inf"), "decord": float("inf")}
            outputs = {}
            for _ in range(args.repeats):
                for name, function in (("naive", lambda p, t: naive_load(p, t)),
                                       ("ours", lambda p, t: vp.load_video(p, t)),
                                       ("decord", lambda p, t: vp.load_video(p, t, backend="decord"))):
                    seconds, outputs[name] = timed(function, path, template)
                    best[name] = min(best[name], seconds)
            same = torch.equal(outputs["ours"], outputs["naive"]) and torch.equal(outputs["ours"], outputs["decord"])
            print(f"{label:>12} {template:>5} {best['naive']:>8.2f} {best['ours']:>7.2f} {best['decord']:>9.2f} "
                  f"{best['ours'] / best['naive']:>11.2f} {same!s:>10}", flush=True)


if __name__ == "__main__":
    main()
