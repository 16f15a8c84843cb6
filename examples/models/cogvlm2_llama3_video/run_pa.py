"""Offline runner of cogvlm2-video-llama3-chat: answers questions about videos.

    python -m examples.models.cogvlm2_llama3_video.run_pa                       # embedded demo model and video
    python -m examples.models.cogvlm2_llama3_video.run_pa --model_path DIR --video_path a.mp4 \\
        --input_texts "What is the general content of this video?"
"""
import json
import os
import sys
import time
from collections.abc import Sequence

import torch

from atb_llm.models.cogvlm2_llama3_video.input_builder_cogvlm2_llama3_video import parse_conversation
from atb_llm.runner.engine import Request
from atb_llm.runner.offline_runner import (
    MultimodalInput,
    MultimodalPARunner,
    base_parser,
    relaunch_under_torchrun,
    report_timings,
    sampling_from_args,
)
from atb_llm.runner.sampler import SamplingParams
from atb_llm.utils.log import logger, print_log

DEFAULT_QUESTION = "What is the general content of this video?"


def _as_list(value) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def query_conversations(queries) -> list[list[dict]]:
    """modeltest's queries as one-turn conversations. Accepted: an object with ``input_texts`` and
    ``video_path`` lists (MindIE's ``MultimodalInput`` batch), or a list whose items are a text, a
    ``MultimodalInput``, a ``{"text", "video"}`` dict or a list of content items (``[{"video": p}, {"text": q}]``,
    the qwen2_vl form of the videobench task)."""
    if hasattr(queries, "input_texts"):
        texts = _as_list(queries.input_texts)
        videos = _as_list(getattr(queries, "video_path", None))
        queries = [MultimodalInput(text, video) for text, video in zip(texts, videos or [None] * len(texts))]
    conversations = []
    for query in queries:
        if isinstance(query, str):
            content = [{"text": query}]
        elif isinstance(query, MultimodalInput):
            content = ([{"video": query.video}] if query.video else []) + [{"text": query.text}]
        elif isinstance(query, dict):
            content = ([{"video": query["video"]}] if query.get("video") else []) + [{"text": query.get("text", "")}]
        else:
            content = list(query)
        conversations.append([{"role": "user", "content": content}])
    return conversations


class Cogvlm2VideoRunner(MultimodalPARunner):
    """The model's runner (the class a modeltest config names).

    MindIE's modeltest builds it from the model YAML (``mm_model.warm_up_input_texts`` / ``warm_up_video_path``
    arrive as ``input_texts`` / ``video_path``), calls ``warm_up()``, then ``infer(queries, **infer_params)``.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.warm_up_texts = _as_list(kwargs.get("input_texts")) or [DEFAULT_QUESTION]
        self.warm_up_videos = _as_list(kwargs.get("video_path"))
        self.warm_up_done = False

    def warm_up(self) -> None:
        """As MindIE's multimodal runner: allocate the KV cache (a full-length sequence per batch slot) and run
        ``max_batch_size`` copies of the first warm-up input for two tokens."""
        video = self.warm_up_videos[0] if self.warm_up_videos else None
        sampling = SamplingParams(max_new_tokens=2, temperature=0.0, ignore_eos=True)
        requests = self.run_prepared([self.prepare_request(MultimodalInput(self.warm_up_texts[0], video), sampling)
                                      for _ in range(self.max_batch_size)])
        errors = [r.error for r in requests if r.error]
        if errors:
            raise RuntimeError(f"warm-up failed: {errors[0]}")
        self.warm_up_done = True

    def infer(self, queries, batch_size: int | None = None, max_output_length: int | None = None,
              ignore_eos: bool = False, max_iters: int | None = None, shm_name_save_path: str | None = None,
              **kwargs) -> tuple[list[str], list[tuple[int, int]], float]:
        """modeltest's entry: greedy answers to ``queries`` -> (texts, (query index, generated tokens) per
        query, end-to-end seconds). A query that fails gets an empty answer and the error is logged.
        ``batch_size`` and ``max_iters`` are accepted for the YAML's sake: the engine batches continuously up
        to ``max_batch_size``. ``shm_name_save_path`` is unused: this runner hands frames over directly."""
        # Never more than the construction-time budget: the warm-up's KV cache was sized for it.
        budget = min(max_output_length or self.max_output_length, self.max_output_length)
        sampling = SamplingParams(max_new_tokens=budget, temperature=0.0, ignore_eos=bool(ignore_eos))
        start = time.perf_counter()
        requests = self.run_prepared([self.prepare_conversation(conversation, sampling)
                                      for conversation in query_conversations(queries)])
        seconds = time.perf_counter() - start
        for i, request in enumerate(requests):
            if request.error:
                print_log(self.rank, logger.error, f"query {i} failed: {request.error}")
        texts = ["" if r.error else r.text for r in requests]
        return texts, [(i, len(r.output_ids)) for i, r in enumerate(requests)], seconds


def pair_inputs(texts: Sequence[str], videos: Sequence[str]) -> list[MultimodalInput]:
    """One video per text, or one video for all texts, or none."""
    if not videos:
        return [MultimodalInput(text) for text in texts]
    if len(videos) == 1:
        return [MultimodalInput(text, videos[0]) for text in texts]
    if len(videos) != len(texts):
        raise SystemExit(f"--video_path takes one path per input text or one for all: got {len(videos)} paths "
                         f"for {len(texts)} texts")
    return [MultimodalInput(text, video) for text, video in zip(texts, videos)]


def read_conversations(path: str) -> list[list]:
    """One conversation per line: a JSON list of messages (or an object with "messages")."""
    conversations = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                raise SystemExit(f"{path}:{number}: not JSON: {error}") from None
            conversations.append(value["messages"] if isinstance(value, dict) else value)
    return conversations


def describe(conversation: list) -> MultimodalInput:
    """The last question and the conversation's video, for printing and the results file."""
    try:
        parsed = parse_conversation(conversation)
        return MultimodalInput(parsed.query, parsed.video)
    except ValueError:
        return MultimodalInput(json.dumps(conversation, ensure_ascii=False)[:200])


def result_record(item: MultimodalInput, request: Request) -> dict:
    return {"input_text": item.text, "video_path": item.video, "output_text": request.text,
            "output_token_ids": list(request.output_ids), "prompt_tokens": len(request.prompt_ids),
            "finish_reason": request.finish_reason, "error": request.error}


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.set_defaults(input_texts=[DEFAULT_QUESTION], max_input_length=2048, max_output_length=64)
    parser.add_argument("--video_path", nargs="*", default=None,
                        help="one video per input text, or one for all (default: the demo video when "
                             "--model_path is absent, else none)")
    parser.add_argument("--tp", type=int, default=None,
                        help="tensor-parallel world size; outside torchrun, relaunches this runner under torchrun "
                             "with that many processes (default: WORLD_SIZE from torchrun, else 1)")
    args = parser.parse_args(argv)
    if args.tp is not None:
        if args.tp < 1:
            raise SystemExit(f"--tp must be at least 1, got {args.tp}")
        if "WORLD_SIZE" not in os.environ and args.tp > 1:
            relaunch_under_torchrun(args.tp, "examples.models.cogvlm2_llama3_video.run_pa",
                                    list(sys.argv[1:] if argv is None else argv))
        if args.tp != int(os.environ.get("WORLD_SIZE", "1")):
            raise SystemExit(f"--tp {args.tp} differs from torchrun's WORLD_SIZE {os.environ.get('WORLD_SIZE', '1')}")
    videos = args.video_path
    if args.model_path is None:
        from examples.models.cogvlm2_llama3_video.make_demo import ensure_demo

        args.model_path, demo_video = ensure_demo()
        print_log(0, logger.info, f"no --model_path: using the embedded demo checkpoint {args.model_path}")
        if videos is None:
            videos = [demo_video]
    try:  # a bad flag or checkpoint is a one-line error, not a traceback
        sampling = sampling_from_args(args)
        runner = Cogvlm2VideoRunner(**vars(args))
    except (ValueError, OSError, NotImplementedError) as error:
        parser.error(str(error))
    if args.input_file:
        conversations = read_conversations(args.input_file)
        items = [describe(conversation) for conversation in conversations]
        requests = runner.run_prepared([runner.prepare_conversation(c, sampling) for c in conversations])
    else:
        items = pair_inputs(args.input_texts, videos or [])
        requests = runner.infer_multimodal(items, sampling)
    for i, (item, request) in enumerate(zip(items, requests)):
        print_log(runner.rank, logger.info, f"Question[{i}]: {item.text} (video: {item.video})")
        if request.error:
            print_log(runner.rank, logger.error, f"Error[{i}]: {request.error}")
        else:
            print_log(runner.rank, logger.info, f"Answer[{i}]: {request.text!r} ({request.finish_reason}, "
                      f"{len(request.output_ids)} tokens, prompt {len(request.prompt_ids)} tokens)")
    timings = report_timings(requests, runner.last_run_seconds, runner.rank)
    if args.results_save_path and runner.rank == 0:
        with open(args.results_save_path, "w", encoding="utf-8") as file:
            json.dump([result_record(item, request) for item, request in zip(items, requests)], file,
                      ensure_ascii=False, indent=2)
    if timings:
        print(f"TTFT mean {timings['ttft_mean_s'] * 1000:.1f} ms, decode {timings['decode_tokens_per_s']:.1f} tokens/s")
    return 1 if all(r.error for r in requests) else 0


if __name__ == "__main__":
    try:
        status = main()
    finally:
        # Left to interpreter shutdown, gloo's threads can abort a clean exit; this file also runs inside
        # MindIE trees, so plain torch.distributed rather than a helper of this repository.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    sys.exit(status)
