"""``python -m service``: a MindIE-Service-compatible HTTP server for cogvlm2-video-llama3-chat.

    python -m service                                   # embedded demo model, 127.0.0.1:1025
    python -m service --model_path DIR --allowed-media-dir /data/multimodal_inputs --port 1025
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import uvicorn

from atb_llm.models.cogvlm2_llama3_video.data_preprocess_cogvlm2_llama3_video import MAX_VIDEO_PIXELS
from atb_llm.runner.engine import DEFAULT_VISION_CACHE_MB
from atb_llm.utils.dist import destroy_distributed
from service.app import build_asgi
from service.core import Service, ServiceConfig, demo_media_dir, follow
from service.http_protocol import protocol_class
from service.media import DEFAULT_MEDIA_DIR
from service.runtime import sweep_stale_resources

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
    p.add_argument("--max-prefill-tokens", type=int, default=8192,
                   help="prompt tokens prefilled per engine step; a longer prompt goes in chunks that share steps "
                        "with the running streams (smaller: steadier streams, slower first tokens)")
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
    p.add_argument("--max-video-pixels", type=int, default=MAX_VIDEO_PIXELS,
                   help="largest decoded frame, width x height (default 3840 x 2160): bigger videos are refused "
                        "before decoding")
    p.add_argument("--tokenizer-workers", type=int, default=2, help="threads decoding videos")
    p.add_argument("--vision-cache-mb", type=int, default=DEFAULT_VISION_CACHE_MB,
                   help="memory for the vision features of recent videos (LRU); a follow-up question on one of them "
                        "skips its decoding and vision tower (0 = off)")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="recompute every prompt instead of reusing the KV blocks of earlier prompts that start with "
                        "the same tokens and video")
    p.add_argument("--tp", type=int, default=None,
                   help="tensor-parallel world size: relaunches under torchrun with that many processes; rank 0 "
                        "serves HTTP and schedules, the others follow its batches (default: WORLD_SIZE, else 1)")
    hardening = p.add_argument_group("limits and access (README.md, Service, Hardening)")
    hardening.add_argument("--max-text-bytes", type=int, default=None,
                           help="UTF-8 bytes of prompt text a request may carry, refused (422) before tokenizing "
                                "(default: 64 x the input limit in tokens)")
    hardening.add_argument("--header-timeout", type=float, default=10.0,
                           help="seconds a connection has to send a complete request head, from its accept or its "
                                "previous response; then it is closed (408 if a partial head arrived)")
    hardening.add_argument("--body-timeout", type=float, default=30.0,
                           help="seconds the whole declared request body has to arrive once its head did (else 408)")
    hardening.add_argument("--keep-alive-timeout", type=float, default=5.0,
                           help="seconds an idle keep-alive connection stays open")
    hardening.add_argument("--max-connections", type=int, default=1000,
                           help="open connections; one more is answered 503 at once and closed (MindIE maxLinkNum; "
                                "0 = unlimited)")
    hardening.add_argument("--api-key", default=os.environ.get("COGVLM2_API_KEY") or None,
                           help="require 'Authorization: Bearer KEY' on every route but the health probes (401 "
                                "otherwise; default: env COGVLM2_API_KEY, else no key)")
    hardening.add_argument("--allowed-media-domain", action="append", dest="allowed_media_domains", default=None,
                           help="host whose http(s) video URLs are downloaded (repeatable; '.example.com' allows its "
                                "subdomains too; redirects are checked again; default: no URL is fetched)")
    hardening.add_argument("--allow-private-media-addresses", action="store_true",
                           help="let allowed media domains resolve to private, loopback or link-local addresses "
                                "(refused by default unless the address itself is an allowed domain)")
    hardening.add_argument("--media-download-timeout", type=float, default=30.0,
                           help="seconds a video download (redirects included) may take")
    hardening.add_argument("--media-download-max-mb", type=int, default=512,
                           help="largest video download in MiB (at most 512)")
    hardening.add_argument("--shutdown-timeout", type=float, default=0.0,
                           help="on SIGTERM/SIGINT, seconds in-flight requests may run to their end while health "
                                "probes and new requests get 503; the rest are then aborted (default 0: abort at "
                                "once)")
    hardening.add_argument("--enable-debug-routes", action="store_true",
                           help="serve GET /debug/resources (KV blocks, shared memory; not in MindIE)")
    p.add_argument("--log-level", default="info")
    return p


def config_from_args(args: argparse.Namespace) -> ServiceConfig:
    allowed = args.allowed_media_dirs
    model_path = args.model_path
    if model_path is None:
        from atb_llm.demo.make_demo import ensure_demo

        model_path, video = ensure_demo()
        if allowed is None:
            allowed = [DEFAULT_MEDIA_DIR, demo_media_dir(video)]
        logging.getLogger("service").info(f"no --model_path: serving the embedded demo checkpoint {model_path}; "
                                          f"demo video {video}")
    for name in ("max_batch_size", "max_input_length", "max_seq_len", "max_iter_times", "block_size",
                 "max_body_mb", "tokenizer_workers", "max_video_pixels"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be a positive integer")
    for name in ("header_timeout", "body_timeout", "keep_alive_timeout"):
        if not getattr(args, name) > 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be a positive number of seconds")
    if args.max_text_bytes is not None and args.max_text_bytes < 1:
        raise SystemExit("--max-text-bytes must be a positive integer")
    if args.max_connections < 0:
        raise SystemExit("--max-connections must be 0 (unlimited) or a positive integer")
    if not args.media_download_timeout > 0:
        raise SystemExit("--media-download-timeout must be a positive number of seconds")
    if not 1 <= args.media_download_max_mb <= 512:
        raise SystemExit("--media-download-max-mb must be in [1, 512]")
    if not args.shutdown_timeout >= 0:
        raise SystemExit("--shutdown-timeout must be 0 or a positive number of seconds")
    if args.vision_cache_mb < 0:
        raise SystemExit("--vision-cache-mb must be 0 (off) or a positive integer")
    return ServiceConfig(
        model_path=model_path, served_model_names=args.served_model_names or list(DEFAULT_NAMES),
        allowed_media_dirs=allowed or [DEFAULT_MEDIA_DIR], max_batch_size=args.max_batch_size,
        max_prefill_tokens=args.max_prefill_tokens, max_input_length=args.max_input_length,
        max_seq_len=args.max_seq_len, max_iter_times=args.max_iter_times, max_queue=max(0, args.max_queue),
        request_timeout=args.request_timeout, block_size=args.block_size, num_blocks=args.num_blocks,
        dtype=args.dtype, device=args.device, max_body_mb=args.max_body_mb,
        tokenizer_workers=args.tokenizer_workers, max_text_bytes=args.max_text_bytes,
        max_video_pixels=args.max_video_pixels, vision_cache_mb=args.vision_cache_mb, prefix_cache=args.prefix_cache,
        allowed_media_domains=args.allowed_media_domains or [],
        allow_private_media_addresses=args.allow_private_media_addresses,
        media_download_timeout=args.media_download_timeout, media_download_max_mb=args.media_download_max_mb)


def _raise_open_file_limit(max_connections: int) -> None:
    """Room for --max-connections sockets beside the model's files: the soft descriptor limit is often 1024."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = max_connections + 512 if max_connections else hard
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else min(want, hard),
                                                        hard))
    except (ImportError, ValueError, OSError) as error:
        logging.getLogger("service").warning(f"could not raise the open-file limit: {error}")


class _Server(uvicorn.Server):
    """On SIGTERM/SIGINT: stop accepting, abort in-flight requests (streams end, waiting calls get 503),
    then uvicorn's graceful shutdown runs the lifespan exit, which releases KV blocks and shared memory.

    With ``shutdown_timeout`` > 0 the first signal drains instead: health probes and new requests answer 503
    while in-flight requests run to their end for up to that many seconds; the rest are then aborted and
    the server exits as above. A second signal during the drain stops at once."""

    def __init__(self, config: uvicorn.Config, service: Service, shutdown_timeout: float = 0.0):
        super().__init__(config)
        self.service = service
        self.shutdown_timeout = shutdown_timeout
        self._draining = False

    def handle_exit(self, sig, frame) -> None:
        if self.shutdown_timeout > 0 and not self._draining and not self.should_exit:
            self._draining = True
            threading.Thread(target=self._drain, name="drain", daemon=True).start()
            return
        self.service.begin_shutdown()
        super().handle_exit(sig, frame)

    def _drain(self) -> None:
        log = logging.getLogger("service")
        log.info(f"draining: {self.service.in_flight} request(s) in flight, up to {self.shutdown_timeout:g} s")
        if not self.service.drain(self.shutdown_timeout):
            log.warning("shutdown timeout: in-flight requests were aborted")
        self.should_exit = True


def supervise_workers(nproc: int, argv: list[str], grace: float = 0.0) -> int:
    """Runs ``nproc`` tensor-parallel server processes and stops them together.

    Not torchrun: on SIGTERM torchrun ends its workers at once and exits non-zero with a traceback, where a
    server should drain. Here SIGTERM/SIGINT go to rank 0, which aborts in-flight requests, releases the
    followers and exits; if any process dies, the others are stopped (SIGTERM, then SIGKILL) and the exit
    status is 1.
    """
    rest = [a for i, a in enumerate(argv) if a != "--tp" and not a.startswith("--tp=")
            and not (i > 0 and argv[i - 1] == "--tp")]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    procs = []
    for rank in range(nproc):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                   LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        # A session of their own: a terminal's Ctrl-C reaches only this supervisor, which forwards it to rank 0.
        procs.append(subprocess.Popen([sys.executable, "-m", "service", *rest], env=env, start_new_session=True))
    stop_requested = []

    def forward(signum, _frame):
        stop_requested.append(time.monotonic())
        if procs[0].poll() is None:
            procs[0].send_signal(signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    killing_since = None
    while True:
        codes = [p.poll() for p in procs]
        if all(code is not None for code in codes):
            sweep_stale_resources()  # what a killed rank 0 left: its shared memory and temp files
            return 0 if all(code == 0 for code in codes) else 1
        failed = any(code not in (None, 0) for code in codes)
        overdue = stop_requested and time.monotonic() - stop_requested[0] > 30 + grace
        if (failed or overdue) and killing_since is None:
            killing_since = time.monotonic()
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
        if killing_since is not None and time.monotonic() - killing_since > 10:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.1)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="[%(asctime)s] [%(process)d] [%(levelname)s] "
                                                              "[%(name)s] %(message)s")
    access = logging.getLogger("service.access")  # one JSON object per line (service/observe.py)
    access_handler = logging.StreamHandler()
    access_handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(access_handler)
    access.propagate = False
    if os.environ.get("RANK", "0") == "0":  # a server, rank 0 or a supervisor (followers make no temp files)
        sweep_stale_resources()  # shared memory and temp files of servers that died without cleaning up
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if args.tp is not None:
        if args.tp < 1:
            raise SystemExit(f"--tp must be at least 1, got {args.tp}")
        if "WORLD_SIZE" not in os.environ and args.tp > 1:
            return supervise_workers(args.tp, list(sys.argv[1:] if argv is None else argv),
                                     grace=max(0.0, args.shutdown_timeout))
        if args.tp != world_size:
            raise SystemExit(f"--tp {args.tp} differs from torchrun's WORLD_SIZE {world_size}")
    config = config_from_args(args)
    try:  # a bad flag or checkpoint is a one-line error, not a traceback
        if int(os.environ.get("RANK", "0")) != 0:
            try:
                follow(config)
            finally:
                destroy_distributed()
            return 0
        service = Service(config)
    except (ValueError, OSError, NotImplementedError) as error:
        build_parser().error(str(error))
    app = build_asgi(service, debug_routes=args.enable_debug_routes, body_timeout=args.body_timeout,
                     api_key=args.api_key)
    _raise_open_file_limit(args.max_connections)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, lifespan="on",
                            timeout_graceful_shutdown=5, access_log=False,
                            http=protocol_class(args.header_timeout), timeout_keep_alive=args.keep_alive_timeout,
                            limit_concurrency=args.max_connections or None)
    server = _Server(config, service, shutdown_timeout=args.shutdown_timeout)
    # uvicorn re-raises the captured signal once it has shut down; a no-op handler makes that exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        server.run()
    finally:
        destroy_distributed()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
