"""The offline runner core shared by the runners: model loading, KV cache, engine, flags and timings.

``PARunner`` takes MindIE's ``run_pa.py`` options; ``MultimodalPARunner`` adds text + video requests. It
depends only on the plugin contract (``ModelRunner``, the input builder, the model) and the engine beside
it, so ``install_into_mindie.sh`` can ship it with the engine into a MindIE tree, whose own
``examples/run_pa.py`` and ``examples/multimodal_runner.py`` differ from ours.
"""
import argparse
import json
import math
import os
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

from atb_llm.runner.cache import CacheConfig, CacheManager, ModelConfig
from atb_llm.runner.engine import DEFAULT_VISION_CACHE_MB, GenerationEngine, Request, VisionCache, video_cache_key
from atb_llm.runner.model_runner import ModelRunner
from atb_llm.runner.sampler import SamplingParams
from atb_llm.utils.log import logger, print_log


def eos_token_ids(runner: ModelRunner) -> list[int]:
    """eos from generation_config.json (an int or a list), else from config.json."""
    generation = getattr(runner.config, "generation_config", None)
    value = getattr(generation, "eos_token_id", None)
    if value is None:
        value = runner.config.eos_token_id
    ids = value if isinstance(value, list) else [value]
    return [int(i) for i in ids if i is not None]


def model_config_of(runner: ModelRunner) -> ModelConfig:
    """The KV cache's view of a loaded model, built as MindIE's ``run_pa.py`` builds it."""
    return ModelConfig(runner.num_heads, runner.num_kv_heads,
                       getattr(runner.config, "num_key_value_heads", runner.num_kv_heads), runner.k_head_size,
                       runner.v_head_size, runner.num_layers, runner.device, runner.kv_cache_dtype, runner.soc_info,
                       runner.kv_quant_type, model_type=getattr(runner.config, "model_type", None))


class PARunner:
    def __init__(self, **kwargs):
        self.rank = int(os.getenv("RANK", "0"))
        self.local_rank = int(os.getenv("LOCAL_RANK", "0"))
        self.world_size = int(os.getenv("WORLD_SIZE", "1"))
        self.model_path = kwargs["model_path"]
        self.max_input_length = kwargs.get("max_input_length", 1024)
        self.max_output_length = kwargs.get("max_output_length", 20)
        self.max_batch_size = kwargs.get("max_batch_size", 1)
        self.max_prefill_tokens = kwargs.get("max_prefill_tokens", -1)
        self.block_size = kwargs.get("block_size", 128)
        self.num_blocks = kwargs.get("num_blocks")
        for name in ("max_input_length", "max_output_length", "max_batch_size", "block_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        self.model = ModelRunner(self.model_path, rank=self.rank, world_size=self.world_size,
                                 local_rank=self.local_rank, dtype=kwargs.get("dtype"),
                                 max_position_embeddings=kwargs.get("max_position_embeddings"),
                                 device=kwargs.get("device"))
        # --quantize is the portable host's (its ModelRunner passes it to the model); MindIE's runner gets no new key.
        extra = {"linear_quantize": kwargs["quantize"]} if kwargs.get("quantize") else {}
        self.model.load_weights(max_batch_size=self.max_batch_size, **extra)
        self.tokenizer = self.model.tokenizer
        self.max_seq_len = min(self.max_input_length + self.max_output_length, self.model.max_position_embeddings)
        self.cache_manager: CacheManager | None = None
        # Kept across runs: a later question on a video this runner has seen skips its decoding and vision tower.
        vision_cache_mb = kwargs.get("vision_cache_mb")
        self.vision_cache = VisionCache((DEFAULT_VISION_CACHE_MB if vision_cache_mb is None else vision_cache_mb) << 20)
        self.prefix_cache = not kwargs.get("no_prefix_cache", False)

    def make_cache_manager(self) -> CacheManager:
        if self.cache_manager is None:
            # As MindIE's warm-up cache: every batch slot can hold a full-length sequence.
            num_blocks = self.num_blocks or math.ceil(self.max_seq_len / self.block_size) * self.max_batch_size
            self.cache_manager = CacheManager(CacheConfig(num_blocks, self.block_size),
                                              model_config_of(self.model))
        return self.cache_manager

    def make_engine(self) -> GenerationEngine:
        return GenerationEngine(self.model, self.make_cache_manager(), max_batch_size=self.max_batch_size,
                                max_prefill_tokens=self.max_prefill_tokens, max_seq_len=self.max_seq_len,
                                max_input_length=self.max_input_length, eos_token_ids=eos_token_ids(self.model),
                                vision_cache=self.vision_cache, enable_prefix_cache=self.prefix_cache)

    def text_request(self, text: str, sampling: SamplingParams, is_chat_model: bool) -> Request:
        if is_chat_model:
            ids = self.model.input_builder.make_context(self.rank, [{"role": "user", "content": text}])
        else:
            ids = self.tokenizer(text, split_special_tokens=True)["input_ids"]
        return Request(prompt_ids=list(ids), sampling=sampling)

    def run(self, requests: Sequence[Request]) -> list[Request]:
        engine = self.make_engine()
        start = time.perf_counter()
        done = engine.generate(requests)
        self.last_run_seconds = time.perf_counter() - start
        if not engine.blocks.all_free:
            raise RuntimeError("KV blocks leaked after the run")  # a bug, never an input problem
        return done

    def infer(self, inputs: Sequence[str], sampling: SamplingParams, is_chat_model: bool = False) -> list[Request]:
        requests = [self.text_request(text, sampling, is_chat_model) for text in inputs]
        return self.run(requests)


def report_timings(requests: Sequence[Request], seconds: float, rank: int = 0) -> dict[str, float]:
    """Time to first token and decode speed of a finished run."""
    served = [r for r in requests if r.first_token_time is not None]
    if not served:
        return {}
    ttft = [r.first_token_time - r.arrival_time for r in served]
    decode_tokens = sum(max(len(r.output_ids) - 1, 0) for r in served)
    decode_seconds = max(r.finish_time for r in served) - min(r.first_token_time for r in served)
    stats = {"requests": len(served), "ttft_mean_s": sum(ttft) / len(ttft), "ttft_max_s": max(ttft),
             "decode_tokens": decode_tokens,
             "decode_tokens_per_s": decode_tokens / decode_seconds if decode_seconds > 0 else float("nan"),
             "total_s": seconds}
    print_log(rank, logger.info, "timings: " + json.dumps({k: round(v, 4) for k, v in stats.items()}))
    return stats


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--typical_p", type=float, default=1.0)
    parser.add_argument("--repetition_penalty", type=float, default=1.0)
    parser.add_argument("--presence_penalty", type=float, default=0.0)
    parser.add_argument("--frequency_penalty", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", nargs="*", default=[])
    parser.add_argument("--stop_token_ids", type=int, nargs="*", default=[])


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    sampling = SamplingParams(
        max_new_tokens=args.max_output_length, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        typical_p=args.typical_p, repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        do_sample=args.temperature > 0, seed=args.seed, stop=list(args.stop),
        stop_token_ids=list(args.stop_token_ids), ignore_eos=args.ignore_eos)
    sampling.validate()
    return sampling


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model_path", help="HF checkpoint directory")
    parser.add_argument("--input_texts", nargs="+", default=["What's deep learning?"])
    parser.add_argument("--input_file", default=None,
                        help="a .jsonl file, one conversation per line: a list of {role, content} messages")
    parser.add_argument("--max_input_length", type=int, default=1024)
    parser.add_argument("--max_output_length", type=int, default=20)
    parser.add_argument("--max_position_embeddings", type=int, default=None)
    parser.add_argument("--max_batch_size", type=int, default=1)
    parser.add_argument("--max_prefill_tokens", "--max-prefill-tokens", dest="max_prefill_tokens", type=int,
                        default=-1, help="prompt tokens prefilled per step; longer prompts go in chunks that share "
                                         "steps with running decodes (<= 0: whole prompts)")
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--num_blocks", type=int, default=None,
                        help="KV blocks (default: one full sequence per batch slot)")
    parser.add_argument("--vision_cache_mb", "--vision-cache-mb", dest="vision_cache_mb", type=int,
                        default=DEFAULT_VISION_CACHE_MB,
                        help="memory for the vision features of recent videos (LRU); a later question on one of "
                             "them skips its decoding and vision tower (0 = off)")
    parser.add_argument("--no_prefix_cache", "--no-prefix-cache", dest="no_prefix_cache", action="store_true",
                        help="recompute every prompt instead of reusing the KV blocks of earlier prompts that start "
                             "with the same tokens and video")
    parser.add_argument("--ignore_eos", action="store_true")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                        help="compute dtype (default: config.json's torch_dtype)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    parser.add_argument("--quantize", choices=("w8a16",), default=None,
                        help="w8a16: the language model's linears in int8 per-channel weights (CPU), quantized at "
                             "load from the float checkpoint; the vision tower stays in full precision")
    parser.add_argument("--results_save_path", default=None, help="write the results as JSON here")
    add_sampling_args(parser)
    return parser


def relaunch_under_torchrun(nproc: int, module: str, argv: list[str]) -> NoReturn:
    """Replaces this process with torchrun running ``python -m module`` on ``nproc`` processes (as run_pa.sh
    does), without the ``--tp`` flag. Replacing, not spawning, lets signals reach torchrun, which stops every
    worker when one fails or when it is told to stop."""
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--tp":
            skip = True
        elif not arg.startswith("--tp="):
            rest.append(arg)
    port = os.environ.get("MASTER_PORT")
    if not port:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = str(sock.getsockname()[1])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               os.environ.get("MASTER_ADDR", "127.0.0.1"), "--master_port", port, "-m", module, *rest]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, command)


@dataclass
class MultimodalInput:
    text: str
    video: str | None = None


class MultimodalPARunner(PARunner):
    # Decoded frames of the last videos, so that several questions on one video prepared together (one batch)
    # decode it once; the vision cache covers the videos the engine has already encoded.
    DECODED_FRAMES_MB = 64

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._decoded = VisionCache(self.DECODED_FRAMES_MB << 20)
        builder = self.model.input_builder
        if builder is not None and hasattr(builder, "cached_video_frames"):
            builder.cached_video_frames = self._known_video_frames

    def forget_videos(self) -> None:
        """Drop the vision features and decoded frames this runner holds."""
        self.vision_cache.clear()
        self._decoded.clear()

    def _video_key(self, path: str) -> str:
        return video_cache_key(path, self.model.input_builder.template)

    def _known_video_frames(self, path: str) -> int | None:
        key = self._video_key(path)
        frames = self.vision_cache.frames(key)
        return frames if frames is not None else self._decoded.frames(key)

    def prepare_conversation(self, conversation: list[dict], sampling: SamplingParams) -> Request:
        """Decode the video and lay out the prompt; a bad input becomes a request that has already failed.
        A video whose features (or frames) this runner already holds is not decoded again."""
        try:
            builder = self.model.input_builder
            prepared = builder.prepare_prompt(conversation)
            key = self._video_key(prepared.video) if prepared.video else None
            pixels, features = prepared.pixels, None
            if prepared.cached:
                features = self.vision_cache.get(key)
                pixels = None if features is not None else self._decoded.get(key)
                if features is None and pixels is None:  # evicted since the lookup: decode after all
                    prepared = builder.prepare_prompt(conversation, use_cache=False)
                    pixels = prepared.pixels
            if pixels is not None and key is not None:
                self._decoded.put(key, pixels, pixels.shape[0])
            return Request(prompt_ids=prepared.ids, sampling=sampling, pixel_values=pixels, vision_embeds=features,
                           video_key=key)
        except (ValueError, OSError) as error:
            return Request(prompt_ids=[], sampling=sampling, finish_reason="error", error=str(error))

    def prepare_request(self, item: MultimodalInput, sampling: SamplingParams) -> Request:
        content = [{"text": item.text}] if item.video is None else [{"video": item.video}, {"text": item.text}]
        return self.prepare_conversation([{"role": "user", "content": content}], sampling)

    def infer_multimodal(self, items: Sequence[MultimodalInput], sampling: SamplingParams) -> list[Request]:
        return self.run_prepared([self.prepare_request(item, sampling) for item in items])

    def run_prepared(self, requests: list[Request]) -> list[Request]:
        """Run the requests that were prepared without error; return all of them, in order."""
        self.run([r for r in requests if r.error is None])
        return requests
