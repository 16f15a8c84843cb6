"""Serving benchmark over HTTP, in the spirit of ``vllm bench serve``: concurrent streaming clients, a mix of text
and video prompts, TTFT / TPOT / ITL (p50, p99) and throughput, and the inter-token latency of running streams
while a 24-frame prompt is prefilled, with the prompt in one step and in chunks, side by side in one run.

The server is ``python -m service`` on the checkpoint of ``bench_followup`` (a 63-layer vision tower of width 128,
a 512 x 8-layer LM with the real vocabulary; float32), started once per configuration; requests go to the
Triton ``generate_stream`` route (one event per token). Videos: 30 s of 1280x720 (24 frames) and 8 s (9 frames).

1. Streams during a 24-frame prefill. ``--streams`` text requests decode (idle inter-token latency measured over a
   few seconds), then a 24-frame video request arrives; the running streams' inter-token latency is measured until
   its first token. Once with ``--max-prefill-tokens`` 8192 (the whole prompt, tower included, in one step) and
   once with ``--chunk`` tokens a step (chunks and the tower's layers share steps with the decodes).
2. Load. ``--clients`` concurrent clients send ``--requests`` requests (text, and questions about two videos:
   the first on a video decodes it, later ones hit the vision and prefix caches), on the chunked server.

Writes a PNG (``--plot``): the streams' inter-token latency around the prefill for both settings, and the load
phase's TTFT and ITL distributions. matplotlib: ``pip install -r requirements/benchmark.txt``.

    .venv/bin/python -m benchmarks.bench_serve [--chunk 64] [--streams 4] [--clients 4] [--requests 16]
"""
import argparse
import itertools
import json
import os
import tempfile
import threading
import time

import httpx
import numpy as np
import torch

from benchmarks.bench_followup import MODEL
from benchmarks.common import ServiceProcess, make_checkpoint, make_video

ROUTE = "/v2/models/cogvlm2/generate_stream"


def stream(base: str, text_input, max_new_tokens: int, times: list, stop: threading.Event | None = None) -> None:
    """Send one streaming request; append (arrival time) per token to ``times``; stop early when ``stop`` is set."""
    body = {"id": "bench", "text_input": text_input, "parameters": {"max_new_tokens": max_new_tokens}}
    times.append(("sent", time.perf_counter()))
    with httpx.stream("POST", base + ROUTE, json=body, timeout=600) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {response.read()[:300]!r}")
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            if "error" in event:
                raise RuntimeError(event["error"])
            times.append(("token", time.perf_counter()))
            if stop is not None and stop.is_set():
                return


def video_input(path: str, question: str) -> list:
    return [{"type": "video_url", "video_url": path}, {"type": "text", "text": question}]


def percentile(values, q) -> float:
    return float(np.percentile(values, q)) * 1000 if len(values) else float("nan")


def streams_during_prefill(server: ServiceProcess, video: str, streams: int, idle_s: float) -> dict:
    stop = threading.Event()
    records = [[] for _ in range(streams)]
    threads = [threading.Thread(target=stream, args=(server.base, f"Tell story number {i} in detail.", 2000,
                                                     records[i], stop)) for i in range(streams)]
    for thread in threads:
        thread.start()
    while sum(1 for r in records if sum(kind == "token" for kind, _ in r) >= 3) < streams:
        time.sleep(0.05)
    time.sleep(idle_s)
    video_times: list = []
    stream(server.base, video_input(video, "What happens in this video?"), 1, video_times)
    submitted, first_token = video_times[0][1], video_times[1][1]
    time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join()
    idle, during, timeline = [], [], []
    for record in records:
        tokens = [t for kind, t in record if kind == "token"]
        for previous, current in itertools.pairwise(tokens[3:]):  # skip each stream's start-up
            gap = current - previous
            timeline.append((current - submitted, gap))
            if current <= submitted:
                idle.append(gap)
            elif previous < first_token:  # the gap overlaps the prefill of the video prompt
                during.append(gap)
    return {"idle": idle, "during": during, "ttft": first_token - submitted, "timeline": timeline}


def load_phase(server: ServiceProcess, videos: list[str], clients: int, requests: int, max_tokens: int) -> dict:
    mix = []
    for i in range(requests):
        kind = i % 4
        if kind == 1:
            mix.append(video_input(videos[0], f"Question {i} about the long video?"))
        elif kind == 3:
            mix.append(video_input(videos[1], f"Question {i} about the short video?"))
        else:
            mix.append(f"Text question number {i}, answer briefly.")
    results: list = [None] * requests
    cursor = iter(range(requests))
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                index = next(cursor, None)
            if index is None:
                return
            times: list = []
            stream(server.base, mix[index], max_tokens, times)
            results[index] = times

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    ttft, tpot, itl, tokens = [], [], [], 0
    for times in results:
        sent = times[0][1]
        stamps = [t for kind, t in times if kind == "token"]
        tokens += len(stamps)
        ttft.append(stamps[0] - sent)
        if len(stamps) > 1:
            tpot.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
            itl += [b - a for a, b in itertools.pairwise(stamps)]
    return {"ttft": ttft, "tpot": tpot, "itl": itl, "tokens": tokens, "wall": wall, "requests": requests}


def plot(path: str, phases: dict, load: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for label, result in phases.items():
        points = sorted(result["timeline"])
        axes[0].scatter([t for t, _ in points], [g * 1000 for _, g in points], s=6, label=label)
        axes[0].axvspan(0, result["ttft"], alpha=0.12, color=axes[0].collections[-1].get_facecolor()[0])
    axes[0].set(title="running streams: inter-token latency\n(shaded: 24-frame prompt until its first token)",
                xlabel="seconds since the video request", ylabel="ms", yscale="log")
    axes[0].legend()
    axes[1].hist(np.array(load["ttft"]) * 1000, bins=20)
    axes[1].set(title="load: time to first token", xlabel="ms", ylabel="requests")
    axes[2].hist(np.array(load["itl"]) * 1000, bins=40)
    axes[2].set(title="load: inter-token latency", xlabel="ms", ylabel="tokens")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunk", type=int, default=64, help="--max-prefill-tokens of the chunked server")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--idle-seconds", type=float, default=4.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--plot", default="bench_serve.png")
    args = parser.parse_args()
    model_dir = make_checkpoint("followup", MODEL)
    long_videos = [make_video(30, seed=seed) for seed in (21, 22)]  # new content per prefill: nothing cached
    short = make_video(8, seed=23)
    media = os.path.dirname(short)
    print(f"torch threads {torch.get_num_threads()}; server: float32, block 16, batch 16; {args.streams} streams; "
          f"tower 63 layers x 128, LM 512 x 8", flush=True)
    phases, load = {}, None
    with tempfile.TemporaryDirectory() as folder:
        for (label, tokens), video in zip([("one step (8192)", 8192), (f"chunks of {args.chunk}", args.chunk)],
                                          long_videos):
            flags = ["--dtype", "float32", "--block-size", "16", "--max-batch-size", "16", "--max-prefill-tokens",
                     str(tokens), "--max-seq-len", "4096", "--max-input-length", "2048", "--max-iter-times", "2048"]
            server = ServiceProcess(model_dir, media, *flags, log_path=os.path.join(folder, f"server-{tokens}.log"))
            try:
                phases[label] = streams_during_prefill(server, video, args.streams, args.idle_seconds)
                if tokens == args.chunk:
                    load = load_phase(server, [long_videos[0], short], args.clients, args.requests, args.max_tokens)
                    print(f"  prefix cache {server.resources()['prefix_cache']}", flush=True)
            finally:
                server.stop()
    print(f"\n1. running streams while a 24-frame prompt prefills ({args.streams} streams)")
    print(f"{'setting':>18} {'idle ITL p50':>13} {'during p50':>11} {'during p99':>11} {'p99 / idle p50':>15} "
          f"{'video TTFT s':>13}")
    for label, result in phases.items():
        idle = percentile(result["idle"], 50)
        print(f"{label:>18} {idle:>10.1f} ms {percentile(result['during'], 50):>8.1f} ms "
              f"{percentile(result['during'], 99):>8.1f} ms {percentile(result['during'], 99) / idle:>15.2f} "
              f"{result['ttft']:>13.2f}")
    print(f"\n2. load: {args.clients} clients, {load['requests']} requests (half text, half video), "
          f"{args.max_tokens} tokens each, chunks of {args.chunk}")
    for name in ("ttft", "tpot", "itl"):
        values = load[name]
        print(f"  {name.upper():>5} p50 {percentile(values, 50):8.1f} ms   p99 {percentile(values, 99):8.1f} ms")
    print(f"  throughput {load['tokens'] / load['wall']:.1f} output tokens/s, {load['requests'] / load['wall']:.2f} "
          f"requests/s ({load['wall']:.1f} s)")
    try:
        plot(args.plot, phases, load)
        print(f"  plot: {args.plot}")
    except ImportError:
        print("  no plot: matplotlib is not installed (pip install -r requirements/benchmark.txt)")


if __name__ == "__main__":
    main()
