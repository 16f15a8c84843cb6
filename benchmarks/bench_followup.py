"""Time to first token of a follow-up question on a video against the first question, 24 frames, full-depth tower.

The checkpoint has the real depth of the vision tower (63 EVA2-CLIP layers) at a reduced width (128, ffn 512,
8 heads), and a Llama-3 LM of hidden 512, 8 layers (8/2 heads, ffn 1792, the real 128256 vocabulary); float32
(bf16 prompt matmuls are emulated on CPUs without AVX512-BF16). The video is 30 s of 1280x720 at 30 fps, so the
chat rule picks 24 frames: a 1650-token prompt. Both paths are measured, side by side in one run:

- offline: ``MultimodalPARunner.prepare_conversation`` (decode, transform) + the engine until the first token;
- service: ``python -m service``, OpenAI chat with ``max_tokens`` 1 (the response time is the time to the first
  token; the video goes through the service path: decode, shared memory, prefill).

Rows: the first question (nothing cached: decode, transform, tower, whole prefill); a follow-up (another
question on the same video: neither decoded nor encoded, the prompt's blocks from the prefix cache); a
follow-up with the prefix cache off (only the vision cache: decoding and the tower skipped, the prompt
recomputed). Ratios are to the first question. Each cold measurement uses a video of new content.

    .venv/bin/python -m benchmarks.bench_followup [--repeats 2] [--skip-service]
"""
import argparse
import os
import tempfile
import time

import httpx
import torch

from atb_llm.runner.offline_runner import MultimodalPARunner
from atb_llm.runner.sampler import SamplingParams
from benchmarks.common import ServiceProcess, make_checkpoint, make_video

MODEL = {"hidden_size": 512, "intermediate_size": 1792, "num_attention_heads": 8, "num_multi_query_heads": 2,
         "num_hidden_layers": 8, "max_position_embeddings": 4096,
         "vision_config": {"hidden_size": 128, "intermediate_size": 512, "num_heads": 8, "num_hidden_layers": 63}}
QUESTIONS = ("What is the general content of this video?", "Which colours do you see?", "Does anything move?")


def conversation(video: str, question: str) -> list[dict]:
    content = [{"type": "video_url", "video_url": video}, {"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


def offline_ttft(runner: MultimodalPARunner, video: str, question: str, prefix_cache: bool = True) -> float:
    runner.prefix_cache = prefix_cache
    engine = runner.make_engine()
    start = time.perf_counter()
    request = runner.prepare_conversation(conversation(video, question),
                                          SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True))
    engine.generate([request])
    assert request.error is None, request.error
    return request.first_token_time - start


def run_offline(model_dir: str, videos: list[str]) -> dict[str, list[float]]:
    runner = MultimodalPARunner(model_path=model_dir, dtype="float32", device="cpu", max_input_length=2048,
                                max_output_length=8, max_batch_size=1, block_size=16)
    offline_ttft(runner, videos[-1], "Warm up.")  # first calls of every kernel; not measured
    times: dict[str, list[float]] = {"first": [], "follow-up": [], "follow-up, no prefix cache": []}
    for video in videos[:-1]:
        runner.forget_videos()
        runner.make_cache_manager().block_manager.reset_prefix_cache()
        times["first"].append(offline_ttft(runner, video, QUESTIONS[0]))
        times["follow-up"].append(offline_ttft(runner, video, QUESTIONS[1]))
        times["follow-up, no prefix cache"].append(offline_ttft(runner, video, QUESTIONS[2], prefix_cache=False))
    return times


def service_ttft(base: str, video: str, question: str) -> float:
    body = {"model": "cogvlm2", "max_tokens": 1, "temperature": 0, "messages": conversation(video, question)}
    start = time.perf_counter()
    response = httpx.post(base + "/v1/chat/completions", json=body, timeout=600)
    elapsed = time.perf_counter() - start
    assert response.status_code == 200, response.text
    return elapsed


def run_service(model_dir: str, videos: list[str], folder: str) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"first": [], "follow-up": [], "follow-up, no prefix cache": []}
    media = os.path.dirname(videos[0])
    for prefix_cache in (True, False):
        flags = ["--dtype", "float32", "--block-size", "16", "--max-batch-size", "1"]
        if not prefix_cache:
            flags.append("--no-prefix-cache")
        server = ServiceProcess(model_dir, media, *flags, log_path=os.path.join(folder, f"server-{prefix_cache}.log"))
        try:
            service_ttft(server.base, videos[-1], "Warm up.")
            for video in videos[:-1]:
                if prefix_cache:
                    times["first"].append(service_ttft(server.base, video, QUESTIONS[0]))
                    times["follow-up"].append(service_ttft(server.base, video, QUESTIONS[1]))
                else:
                    service_ttft(server.base, video, QUESTIONS[0])
                    times["follow-up, no prefix cache"].append(service_ttft(server.base, video, QUESTIONS[2]))
            stats = server.resources()
            print(f"  service ({'prefix cache on' if prefix_cache else 'prefix cache off'}): prefix cache "
                  f"{stats['prefix_cache']['hits']}/{stats['prefix_cache']['queries']} tokens hit, vision cache "
                  f"{stats['vision_cache']['hits']} hits", flush=True)
        finally:
            server.stop()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="cold videos per path (best of them is shown)")
    parser.add_argument("--skip-service", action="store_true")
    args = parser.parse_args()
    model_dir = make_checkpoint("followup", MODEL)
    videos = [make_video(30, size=(1280, 720), seed=seed) for seed in range(1, args.repeats + 2)]
    print(f"torch threads {torch.get_num_threads()}; vision tower 63 layers x width 128; LM 512 x 8 layers; "
          f"float32; 24 frames of 1280x720")
    results = {"offline": run_offline(model_dir, videos)}
    if not args.skip_service:
        with tempfile.TemporaryDirectory() as folder:
            results["service"] = run_service(model_dir, videos, folder)
    print(f"{'path':>8} {'request':>28} {'TTFT s':>8} {'ratio to first':>15}")
    for path, times in results.items():
        first = min(times["first"])
        for name, values in times.items():
            print(f"{path:>8} {name:>28} {min(values):>8.3f} {min(values) / first:>15.3f}")


if __name__ == "__main__":
    main()
