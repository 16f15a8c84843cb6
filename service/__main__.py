"""``python -m service``: a MindIE-Service-compatible HTTP server for cogvlm2-video-llama3-chat.

    python -m service                                   # embedded demo model, 127.0.0.1:1025
    python -m service --model_path DIR --allowed-media-dir /data/multimodal_inputs --port 1025
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys

import uvicorn

from service.app import BodyLimit, create_app
from service.core import Service, ServiceConfig, demo_media_dir
from service.media import DEFAULT_MEDIA_DIR

DEFAULT_NAMES = ["cogvlm2_llama3_video", "cogvlm2"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m service", description=__doc__.splitlines()[0])
    p.add_argument("--model_path", "--model-path", dest="model_path", default=None,
                   help="HF checkpoint directory (default: the embedded demo checkpoint)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1025)
    p.add_argument("--served-model-name", action="append", dest="served_model_names", default=None,
                   help="model name clients use (repeatable; default: cogvlm2_llama3_video and cogvlm2)")
    p.add_argument("--allowed-media-dir", action="append", dest="allowed_media_dirs", default=None,
                   help=f"directory local videos may be read from (repeatable; default: {DEFAULT_MEDIA_DIR}, plus "
                        "the demo video's directory when using the embedded demo)")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--max-prefill-tokens", type=int, default=8192)
    p.add_argument("--max-input-length", type=int, default=2048, help="MindIE maxInputTokenLen")
    p.add_argument("--max-seq-len", type=int, default=2560, help="prompt + output tokens (MindIE maxSeqLen)")
    p.add_argument("--max-iter-times", type=int, default=512,
                   help="default and upper bound of generated tokens (MindIE maxIterTimes)")
    p.add_argument("--max-queue", type=int, default=1000,
                   help="waiting requests before new ones get 503 + Retry-After (0 = unbounded)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="end-to-end seconds (MindIE e2eTimeout)")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--num-blocks", type=int, default=None,
                   help="KV cache blocks (default: a full-length sequence per batch slot)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    p.add_argument("--max-body-mb", type=int, default=40, help="request body limit (MindIE maxRequestLength)")
    p.add_argument("--tokenizer-workers", type=int, default=2, help="threads decoding videos")
    p.add_argument("--log-level", default="info")
    return p


def config_from_args(args: argparse.Namespace) -> ServiceConfig:
    allowed = args.allowed_media_dirs
    model_path = args.model_path
    if model_path is None:
        from examples.models.cogvlm2_llama3_video.make_demo import ensure_demo

        model_path, video = ensure_demo()
        if allowed is None:
            allowed = [DEFAULT_MEDIA_DIR, demo_media_dir(video)]
        logging.getLogger("service").info(f"no --model_path: serving the embedded demo checkpoint {model_path}; "
                                          f"demo video {video}")
    for name in ("max_batch_size", "max_input_length", "max_seq_len", "max_iter_times", "block_size",
                 "max_body_mb", "tokenizer_workers"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be a positive integer")
    return ServiceConfig(
        model_path=model_path, served_model_names=args.served_model_names or list(DEFAULT_NAMES),
        allowed_media_dirs=allowed or [DEFAULT_MEDIA_DIR], max_batch_size=args.max_batch_size,
        max_prefill_tokens=args.max_prefill_tokens, max_input_length=args.max_input_length,
        max_seq_len=args.max_seq_len, max_iter_times=args.max_iter_times, max_queue=max(0, args.max_queue),
        request_timeout=args.request_timeout, block_size=args.block_size, num_blocks=args.num_blocks,
        dtype=args.dtype, device=args.device, max_body_mb=args.max_body_mb,
        tokenizer_workers=args.tokenizer_workers)


class _Server(uvicorn.Server):
    """On SIGTERM/SIGINT: stop accepting, abort in-flight requests (streams end, waiting calls get 503),
    then uvicorn's graceful shutdown runs the lifespan exit, which releases KV blocks and shared memory."""

    def __init__(self, config: uvicorn.Config, service: Service):
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig, frame) -> None:
        self.service.begin_shutdown()
        super().handle_exit(sig, frame)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="[%(asctime)s] [%(process)d] [%(levelname)s] "
                                                              "[%(name)s] %(message)s")
    service = Service(config_from_args(args))
    app = BodyLimit(create_app(service), service.config.max_body_mb)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, lifespan="on",
                            timeout_graceful_shutdown=5, access_log=False)
    server = _Server(config, service)
    # uvicorn re-raises the captured signal once it has shut down; a no-op handler makes that exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
