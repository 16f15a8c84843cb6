"""The service against hostile clients: bad bodies, huge text, oversized bodies, slow and stuck connections,
overload, leaks and access control. One real server subprocess (tiny long-context checkpoint, batch 1 and queue 1,
small limits and timeouts, an API key from COGVLM2_API_KEY, no debug routes), plus a few in-process checks.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import threading
import time

import httpx
import pytest

from tests.test_service import Server

KEY = "test-key-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}
HEADER_TIMEOUT = 1.5
BODY_TIMEOUT = 1.5
KEEP_ALIVE = 1.0
MAX_CONNECTIONS = 80
MAX_BODY_MB = 1
INPUT_LIMIT = 2048  # --max-input-length default; the text limit defaults to 64 bytes per token of it
TEXT_LIMIT = 64 * INPUT_LIMIT
OA = {"model": "cogvlm2", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def media(tmp_path_factory, video_6_frames) -> dict:
    root = tmp_path_factory.mktemp("hardening")
    allowed = root / "allowed"
    allowed.mkdir()
    shutil.copy(video_6_frames, allowed / "clip.mp4")
    (allowed / "corrupt.mp4").write_bytes(os.urandom(4096))
    return {"root": str(root), "dir": str(allowed), "clip": str(allowed / "clip.mp4"),
            "corrupt": str(allowed / "corrupt.mp4")}


@pytest.fixture(scope="module")
def server(tmp_path_factory, media):
    from atb_llm.demo.make_demo import make_demo_checkpoint

    # A long context, so one request can hold the only batch slot for as long as the overload test needs.
    model = make_demo_checkpoint(str(tmp_path_factory.mktemp("hard_model")), seed=1, shards=1,
                                 overrides={"max_position_embeddings": 32768})
    srv = Server(model, media["dir"], "--max-batch-size", "1", "--max-queue", "1",
                     "--max-seq-len", "32768", "--max-iter-times", "32000", "--max-body-mb", str(MAX_BODY_MB),
                     "--header-timeout", str(HEADER_TIMEOUT), "--body-timeout", str(BODY_TIMEOUT),
                     "--keep-alive-timeout", str(KEEP_ALIVE), "--max-connections", str(MAX_CONNECTIONS),
                     env={"COGVLM2_API_KEY": KEY}, headers=AUTH, debug_routes=False, log_dir=media["root"])
    yield srv
    code, log = srv.stop(), srv.output()
    srv.log.close()
    assert code == 0, log[-4000:]
    assert "Traceback" not in log, log[-4000:]  # nothing above reached an unhandled exception


def _error(resp: httpx.Response, status: int = 422) -> str:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error", "error_type"}, body
    return body["error"]


# Every route that reads a body, with a body whose only problem is planted at ``X``.
ROUTES = [
    ("/generate", lambda x: {"prompt": x}),
    ("/generate", lambda x: {"inputs": x}),
    ("/generate_stream", lambda x: {"inputs": x}),
    ("/", lambda x: {"inputs": x}),
    ("/v2/models/cogvlm2/generate", lambda x: {"text_input": x}),
    ("/v2/models/cogvlm2/generate_stream", lambda x: {"text_input": x}),
    ("/v1/chat/completions", lambda x: {**OA, "messages": [{"role": "user", "content": x}]}),
    ("/v1/completions", lambda x: {"model": "cogvlm2", "prompt": x}),
    ("/infer", lambda x: {"inputs": x}),
    ("/v2/models/cogvlm2/infer", lambda x: {"inputs": [{"name": x, "shape": [1], "datatype": "UINT32", "data": [1]}],
                                            "outputs": [{"name": "o"}]}),
    ("/v2/models/cogvlm2/stopInfer", lambda x: {"id": x}),
]


# -- finding 1: bad input is a 422, never a 500 --------------------------------------------------------------

@pytest.mark.parametrize(("path", "make"), ROUTES, ids=[f"{i}{p}" for i, (p, _) in enumerate(ROUTES)])
def test_deep_json_and_lone_surrogates_are_422(server, path, make):
    deep = "[" * 100_000 + "]" * 100_000
    raw = json.dumps(make("PLACEHOLDER")).replace('"PLACEHOLDER"', deep)
    assert "10 levels" in _error(server.client.post(path, content=raw))
    eleven = json.dumps(make("hi")).replace('"hi"', "[" * 11 + '"hi"' + "]" * 11)  # 12 levels with the body
    assert "nesting deeper than 10 levels" in _error(server.client.post(path, content=eleven))
    for planted in ('"\\ud800"', '"a\\udfffb"', '"\\uDBFF"'):
        raw = json.dumps(make("PLACEHOLDER")).replace('"PLACEHOLDER"', planted)
        assert "unpaired UTF-16 surrogate" in _error(server.client.post(path, content=raw))
    key = json.dumps({**make("hi"), "PLACEHOLDER": 1}).replace('"PLACEHOLDER"', '"\\ud800"')
    assert "unpaired UTF-16 surrogate" in _error(server.client.post(path, content=key))


def test_nesting_up_to_the_limit_and_surrogate_pairs_are_accepted(server):
    # An escaped surrogate pair (what json.dumps writes for an emoji) and 11 levels, counting the body itself.
    raw = '{"inputs": "hi \\ud83d\\ude00", "parameters": {"max_new_tokens": 1}, "x": ' + "[" * 10 + "]" * 10 + "}"
    resp = server.client.post("/generate", content=raw)
    assert resp.status_code == 200, resp.text


def test_nul_in_a_video_path_is_a_422(server, media):
    for url in (media["dir"] + "/cl\0ip.mp4", "file://" + media["dir"] + "/\0.mp4", media["clip"] + "\0.txt"):
        for path, body in [("/generate", {"prompt": [{"type": "text", "text": "a"},
                                                     {"type": "video_url", "video_url": url}]}),
                           ("/v1/chat/completions", {**OA, "messages": [{"role": "user", "content": [
                               {"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "a"}]}]})]:
            error = _error(server.client.post(path, json=body))
            assert error.startswith("[InferTokenizer::DownloadUrl] Download fail: ") and "NUL" in error


# -- finding 2: huge text is refused before it is tokenized ------------------------------------------------

def test_text_over_the_limit_is_refused_before_tokenizing(server, media):
    big = "word " * (TEXT_LIMIT // 5 + 1)  # 640 KB: fits the body limit, far over the text limit
    items = [{"type": "text", "text": big}, {"type": "video_url", "video_url": media["corrupt"]}]
    bodies = [("/generate", {"prompt": big}), ("/generate", {"inputs": big}), ("/generate", {"prompt": items}),
              ("/generate", {"inputs": items}), ("/generate_stream", {"inputs": big}), ("/", {"inputs": big}),
              ("/v2/models/cogvlm2/generate", {"text_input": big}), ("/infer", {"inputs": big}),
              ("/infer", {"inputs": items}), ("/v1/completions", {"model": "cogvlm2", "prompt": big}),
              ("/v1/chat/completions", {**OA, "messages": [{"role": "user", "content": big}]}),
              ("/v1/chat/completions", {**OA, "messages": [{"role": "user", "content": items}]}),
              ("/v1/chat/completions", {**OA, "messages": [{"role": "system", "content": big[: TEXT_LIMIT // 2]},
                                                           {"role": "user", "content": big[: TEXT_LIMIT // 2 + 8]}]})]
    for path, body in bodies:
        start = time.monotonic()
        error = _error(server.client.post(path, json=body))
        assert f"longer than {TEXT_LIMIT} bytes" in error and "--max-text-bytes" in error, (path, error)
        assert time.monotonic() - start < 5
    # Multi-byte text counts in UTF-8 bytes: 50,000 three-byte characters are 150,000 bytes.
    assert "longer than" in _error(server.client.post("/generate", json={"inputs": "\u4e2d" * 50_000}))
    ok = server.client.post("/generate", json={"inputs": "\u4e2d" * 100, "parameters": {"max_new_tokens": 1}})
    assert ok.status_code == 200, ok.text


# -- finding 5: a full queue answers 503 before any media is resolved or decoded ----------------------------

def test_full_queue_is_503_before_the_video_is_decoded(server, media):
    long = {"text_input": "Count.", "parameters": {"max_new_tokens": 30000}}
    results: dict = {}

    def run(name: str) -> None:
        results[name] = server.client.post("/v2/models/cogvlm2/generate", json={**long, "id": name})

    running = threading.Thread(target=run, args=("running",))
    running.start()
    time.sleep(1.0)  # "running" takes the only batch slot; then "waiting" fills the queue (ready answers 503)
    waiting = threading.Thread(target=run, args=("waiting",))
    waiting.start()
    deadline = time.monotonic() + 60  # a bound on a hang, not a speed check
    while server.client.get("/v2/health/ready").status_code != 503:
        assert time.monotonic() < deadline, "the queue never filled"
        time.sleep(0.05)
    try:
        with open(media["corrupt"], "rb") as file:
            inline = "data:video/mp4;base64," + base64.b64encode(file.read()).decode()
        # Videos that would be refused once looked at (corrupt: 422; missing: 400): a 503 proves the queue was
        # checked before the media was resolved, written or decoded (no timing involved).
        for path, body in [
            ("/generate", {"prompt": [{"type": "video_url", "video_url": media["corrupt"]},
                                      {"type": "text", "text": "a"}]}),
            ("/generate", {"prompt": [{"type": "video_url", "video_url": media["dir"] + "/missing.mp4"},
                                      {"type": "text", "text": "a"}]}),
            ("/v1/chat/completions", {**OA, "messages": [{"role": "user", "content": [
                {"type": "video_url", "video_url": inline}, {"type": "text", "text": "a"}]}]}),
            ("/v1/completions", {"model": "cogvlm2", "prompt": "hello"}),
        ]:
            resp = server.client.post(path, json=body)
            assert "queue is full" in _error(resp, 503) and resp.headers["retry-after"] == "1"
    finally:
        for name in ("running", "waiting"):
            server.client.post("/v2/models/cogvlm2/stopInfer", json={"id": name})
        running.join(60)
        waiting.join(60)
    assert results["running"].status_code == 200 and results["waiting"].status_code == 200


# -- finding 6: nothing sensitive in error bodies; API key; debug routes -----------------------------------

def test_errors_about_an_inline_video_do_not_name_the_temp_file(server, media):
    inline = "data:video/mp4;base64," + base64.b64encode(os.urandom(3000)).decode()
    for path, body in [("/generate", {"prompt": [{"type": "video_url", "video_url": inline},
                                                 {"type": "text", "text": "a"}]}),
                       ("/v1/chat/completions", {**OA, "messages": [{"role": "user", "content": [
                           {"type": "video_url", "video_url": {"url": inline}}, {"type": "text", "text": "a"}]}]})]:
        error = _error(server.client.post(path, json=body))
        assert "Cause: " in error and "the inline video" in error, error
        for leak in ("/tmp", "cogvlm2-svc", "inline_0", "Traceback", "Error:", "tmp"):
            assert leak not in error, error
    local = _error(server.client.post("/generate", json={"prompt": [
        {"type": "video_url", "video_url": "file://" + media["corrupt"]}, {"type": "text", "text": "a"}]}))
    assert f"'{media['corrupt']}'" in local and "''" not in local  # the path the client sent, quoted once


def test_api_key_guards_every_route_but_the_health_probes(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": "Basic x"}):
        for method, path in [("POST", "/generate"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
                             ("GET", "/info"), ("GET", "/no/such/route"), ("POST", "/v2/models/cogvlm2/stopInfer")]:
            resp = httpx.request(method, server.base + path, json={"inputs": "hi"}, headers=headers, timeout=10)
            assert resp.status_code == 401, (path, headers, resp.text)
            assert resp.headers["www-authenticate"] == "Bearer" and resp.json()["error_type"] == "Unauthorized"
    for path in ("/health", "/v2/health/ready", "/v2/health/live", "/v2/models/cogvlm2/ready"):
        assert httpx.get(server.base + path, timeout=10).status_code == 200
    assert httpx.get(server.base + "/v1/models", headers={"Authorization": f"bearer {KEY}"}).status_code == 200
    assert server.client.get("/info").status_code == 200


def test_debug_routes_are_off_by_default(server):
    resp = server.client.get("/debug/resources")
    assert resp.status_code == 404 and resp.content == b""


def test_internal_errors_say_internal_error_with_an_id_and_log_the_details(caplog):
    import asyncio

    from fastapi.testclient import TestClient

    from atb_llm.runner.engine import StepOutput
    from service.app import collect_all, create_app
    from service.core import _decode_cause
    from service.errors import ApiError
    from service.media import MediaResolver
    from service.runtime import Event

    secret = "gloo: Connection closed by peer [127.0.0.1]:29500 in /tmp/cogvlm2-svc-0/1-2-x/shm_name.txt"

    from types import SimpleNamespace

    app = create_app(SimpleNamespace(config=SimpleNamespace(served_model_names=["cogvlm2"])))  # type: ignore

    @app.get("/boom")
    async def boom():
        raise RuntimeError(secret)

    resp = TestClient(app, raise_server_exceptions=False).get("/boom")
    assert resp.status_code == 500 and resp.text.startswith("Server internal error (request id ")
    assert secret not in resp.text and "RuntimeError" not in resp.text
    assert resp.headers["x-request-id"] in resp.text
    assert any(resp.headers["x-request-id"] in r.getMessage() for r in caplog.records)

    class FakeHandle:
        def __init__(self):
            self.requests, self.submit_time, self.stopped = [object()], 0.0, False

        async def events(self, _request):
            yield Event(StepOutput("r", [], "", True, "error", f"engine failure: {secret}"), 1, 0.0)

    with pytest.raises(ApiError) as failed:
        asyncio.run(collect_all(FakeHandle(), None))  # type: ignore[arg-type]
    assert failed.value.status == 500 and "internal error (request id " in failed.value.message
    assert secret not in failed.value.message and "gloo" not in failed.value.message

    resolver = MediaResolver(["/data"], lambda: "/tmp/req")
    resolver.hidden["/tmp/req/inline_0.mp4"] = "the inline video"
    for error in (RuntimeError(secret), OSError(28, "No space left on device", "/dev/shm/x"), ValueError("")):
        cause = _decode_cause(error, resolver, "/tmp/req")
        assert "/tmp" not in cause and "/dev/shm" not in cause and "Error" not in cause
    assert _decode_cause(ValueError("cannot open video '/tmp/req/inline_0.mp4': moov atom not found"), resolver,
                         "/tmp/req") == "cannot open video the inline video: moov atom not found"


# -- finding 3: an over-limit body gets a readable 413 -----------------------------------------------------

TOO_LARGE = {"message": f"Request body too large. Maximum allowed size is {MAX_BODY_MB}MB."}


def test_over_limit_bodies_get_a_readable_413(server):
    """The server answers 413 at once (from Content-Length), then reads and discards the rest of the upload
    until the client is done: a client that writes its whole body before reading (urllib, requests, a raw
    socket) used to get a broken pipe or a connection reset instead of the answer."""
    import urllib.error
    import urllib.request

    size = 20 * 2**20  # 20x the limit: the client is still uploading when the server answers
    inline = "data:video/mp4;base64," + "A" * size
    cases = [
        {"json": {**OA, "messages": [{"role": "user", "content": [{"type": "video_url", "video_url": inline}]}]}},
        {"content": b"x" * size},
        {"content": (b"x" * 65536 for _ in range(size // 65536))},  # chunked: no Content-Length
    ]
    for kwargs in cases:
        resp = server.client.post("/v1/chat/completions", **kwargs)
        assert resp.status_code == 413 and resp.json() == TOO_LARGE
        assert resp.headers["connection"] == "close"
    for _ in range(2):
        request = urllib.request.Request(server.base + "/generate", data=b"x" * size, headers=AUTH)
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(request, timeout=60)
        assert answer.value.code == 413 and json.loads(answer.value.read()) == TOO_LARGE
    with server.connect() as sock:
        sock.sendall(f"POST /generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                     f"Content-Length: {size}\r\n\r\n".encode())
        sock.sendall(b"x" * size)  # all of it is taken (and discarded), no broken pipe
        head, _, payload = _read_until_closed(sock, 10).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413 ") and json.loads(payload) == TOO_LARGE
    ok = server.client.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 1}})
    assert ok.status_code == 200


def test_over_limit_bodies_get_a_readable_413_with_curl(server, tmp_path):
    body = tmp_path / "big.json"
    body.write_bytes(b'{"inputs": "' + b"x" * (20 * 2**20) + b'"}')
    for extra in ([], ["-H", "Expect:"]):  # with curl's 100-continue, and uploading the whole body at once
        proc = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", "-H", f"Authorization: Bearer {KEY}",
                               "-H", "Content-Type: application/json", *extra, "--data-binary", f"@{body}",
                               server.base + "/generate"], capture_output=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        text, _, code = proc.stdout.rpartition(b"\n")
        assert code == b"413" and json.loads(text) == TOO_LARGE


# -- finding 4: slow, stuck and surplus connections --------------------------------------------------------

def _read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError) as error:
            raise AssertionError(f"the connection was not closed cleanly: {error!r} after {data!r}") from None
        if not chunk:
            return data
        data += chunk


def test_half_sent_requests_are_closed_and_do_not_lock_clients_out(server):
    stuck = []
    for i in range(50):
        sock = server.connect()
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\n" if i % 2 else b"GET /he")
        stuck.append(sock)
    silent = server.connect()  # connects and sends nothing
    liar = server.connect()  # declares 1000 bytes, sends 10
    liar.sendall(f"POST /generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                 "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"inputs\"".encode())
    drip = server.connect()  # a header line every 0.2 s: the header deadline is not reset by data
    drip.sendall(b"POST /generate HTTP/1.1\r\n")
    stop_drip = threading.Event()

    def dripping():
        with_error = False
        while not stop_drip.is_set() and not with_error:
            try:
                drip.sendall(b"X-Slow: 1\r\n")
            except OSError:
                with_error = True
            time.sleep(0.2)

    dripper = threading.Thread(target=dripping)
    dripper.start()
    start = time.monotonic()
    try:
        for _ in range(3):
            t = time.monotonic()
            assert httpx.get(server.base + "/health", timeout=5).status_code == 200
            assert time.monotonic() - t < 2
        for sock in stuck:
            data = _read_until_closed(sock, HEADER_TIMEOUT + 5)
            assert data == b"" or data.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), data
        assert _read_until_closed(silent, 5) == b""
        data = _read_until_closed(liar, 5)
        assert data.startswith(b"HTTP/1.1 408 ") and b"did not arrive within 1.5 s" in data, data
        assert _read_until_closed(drip, 5).startswith(b"HTTP/1.1 408 ")
        assert time.monotonic() - start < HEADER_TIMEOUT + BODY_TIMEOUT + 3
    finally:
        stop_drip.set()
        dripper.join()
        for sock in [*stuck, silent, liar, drip]:
            sock.close()
    assert server.client.get("/health").status_code == 200


def test_idle_keep_alive_connections_are_closed(server):
    sock = server.connect()
    body = json.dumps({"inputs": "hi", "parameters": {"max_new_tokens": 2}}).encode()
    sock.sendall(b"POST /generate_stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                 + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
                 + body)
    data = b""
    sock.settimeout(30)
    while not data.endswith(b"0\r\n\r\n"):  # the end of the chunked event stream: the connection stays open
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    assert data.startswith(b"HTTP/1.1 200 ")
    start = time.monotonic()
    assert _read_until_closed(sock, KEEP_ALIVE + 5) == b""
    assert time.monotonic() - start < KEEP_ALIVE + 2
    sock.close()


def test_connections_over_the_cap_get_a_clean_503(server):
    time.sleep(0.5)  # let the connections of earlier tests finish closing
    socks = []
    try:
        for _ in range(MAX_CONNECTIONS + 5):
            socks.append(server.connect())
        for sock in socks[-5:]:  # accepted in order: at least the last five are over the cap
            sock.settimeout(5)
            head, _, payload = sock.recv(65536).partition(b"\r\n\r\n")  # answered at once, unasked
            assert head.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in head and b"connection: close" in head
            assert json.loads(payload) == {"error": f"Too many open connections (the limit is {MAX_CONNECTIONS}); "
                                                    "retry later", "error_type": "Service Unavailable"}
    finally:
        for sock in socks:
            sock.close()
    deadline = time.monotonic() + 5
    while httpx.get(server.base + "/health", timeout=5).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)
