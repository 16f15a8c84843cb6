"""The HTTP service (``python -m service``) against a real server subprocess on a tiny checkpoint.

One module-scoped server serves most tests; a second, small one (batch 1, queue 1) covers the full
queue, timeouts and SIGTERM. The last test of the main server checks that every KV block is free and
that no shared-memory segment the server created is left.
"""
from __future__ import annotations

import base64
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The six requests of the model's original README, machine-readable (see the file's "about").
SEED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "seed_requests.json")
TOKEN_MSG0 = ("Messages token length must be in (0, 1048576], but got 0. This could be caused by invalid input "
              "format or empty content.")
GENERATE_PARSE = ('{"Error": "`inputs` or `prompt` must be necessary and data type must be string. Additionally, '
                  'the request body must be valid json", "error_type": "validation"}')
MAX_CHARS = 40 * 2**20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m service`` on a free loopback port, healthy when constructed. ``/debug/resources`` is on
    unless ``debug_routes=False``; ``headers`` go with every request of ``client`` (e.g. an API key)."""

    def __init__(self, model_dir: str, media_dir: str, *extra: str, env: dict | None = None,
                 headers: dict | None = None, debug_routes: bool = True, log_dir: str | None = None):
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = open(os.path.join(log_dir or media_dir, f"server-{self.port}.log"), "w+")  # noqa: SIM115
        debug = ["--enable-debug-routes"] if debug_routes else []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "--model_path", model_dir, "--port", str(self.port),
             "--allowed-media-dir", media_dir, *debug, *extra], cwd=REPO, stdout=self.log,
            stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:  # a probe: no key needed
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            raise RuntimeError(f"server did not become healthy:\n{self.output()}")
        self.client = httpx.Client(base_url=self.base, timeout=120, headers=headers)

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def resources(self) -> dict:
        return self.client.get("/debug/resources").json()

    def wait_idle(self, timeout: float = 20) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            res = self.resources()
            if (res["kv_blocks_all_free"] and res["requests_active"] == 0 and not res["active_shm_segments"]
                    and res["request_resources_active"] == 0):
                return res
            if time.monotonic() > deadline:
                raise AssertionError(f"server did not go idle: {res}")
            time.sleep(0.05)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.client.close()  # the log stays readable: a failed stop shows it
        return self.proc.returncode


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory, video_6_frames) -> str:
    root = tmp_path_factory.mktemp("media")
    media = root / "allowed"
    media.mkdir()
    shutil.copy(video_6_frames, media / "clip.mp4")
    (media / "corrupt.mp4").write_bytes(os.urandom(4096))
    (media / "notes.txt").write_text("not a video")
    os.symlink(media / "clip.mp4", media / "link.mp4")
    shutil.copy(video_6_frames, root / "outside.mp4")
    return str(media)


@pytest.fixture(scope="module")
def clip(media_dir) -> str:
    return os.path.join(media_dir, "clip.mp4")


@pytest.fixture(scope="module")
def server(chat_model_dir, media_dir):
    srv = Server(chat_model_dir, media_dir, "--max-batch-size", "16", "--max-seq-len", "640")
    yield srv
    assert srv.stop() == 0, srv.output()


def _seed_requests(video: str) -> list[dict]:
    with open(SEED, encoding="utf-8") as file:
        seed = json.load(file)
    placeholder = seed["video_placeholder"]
    out = []
    for req in seed["requests"]:
        req = copy.deepcopy(req)
        req["body"] = json.loads(json.dumps(req["body"]).replace(placeholder, video))
        req["body_text_as_written"] = req["body_text_as_written"].replace(placeholder, video)
        out.append(req)
    return out


def _curl(base: str, path: str, data: str) -> tuple[int, bytes]:
    proc = subprocess.run(["curl", "-sS", "-N", "-w", "\n%{http_code}", "-H", "Content-Type: application/json",
                           "-X", "POST", "--data-binary", "@-", base + path], input=data.encode(),
                          capture_output=True, timeout=120, check=True)
    body, _, code = proc.stdout.rpartition(b"\n")
    return int(code), body


def _sse(body: bytes, prefix: bytes) -> list[bytes]:
    assert body.endswith(b"\n\n"), body[-200:]
    events = body[:-2].split(b"\n\n")
    for event in events:
        assert event.startswith(prefix), event
    return [event[len(prefix):] for event in events]


# -- the seed's six requests --------------------------------------------------------------------------

SEED_NAMES = ["vllm_generate", "tgi_generate", "triton_generate_stream", "triton_generate", "openai_chat",
              "openai_chat_multiturn"]


@pytest.mark.parametrize("name", SEED_NAMES)
def test_seed_request_with_curl(server, clip, name):
    req = next(r for r in _seed_requests(clip) if r["name"] == name)
    status, body = _curl(server.base, req["path"], json.dumps(req["body"]))
    assert status == 200, body
    if name == "vllm_generate":
        obj = json.loads(body)
        assert list(obj) == ["text"] and len(obj["text"]) == 1
        assert obj["text"][0].startswith("Question: what is the general content of this video? Answer: ")
    elif name == "tgi_generate":
        obj = json.loads(body)
        assert list(obj) == ["generated_text"] and isinstance(obj["generated_text"], str)
    elif name == "triton_generate":
        obj = json.loads(body)
        assert list(obj) == ["id", "model_name", "model_version", "text_output", "details"]
        assert obj["id"] == "a123" and obj["model_name"] == "cogvlm2" and obj["model_version"] is None
        details = obj["details"]
        assert set(details) == {"finish_reason", "generated_tokens", "first_token_cost", "decode_cost", "batch_size",
                                "queue_wait_time"}
        assert details["finish_reason"] in ("eos_token", "length", "stop_sequence")
        assert len(details["batch_size"]) == details["generated_tokens"] > 0
    elif name == "triton_generate_stream":
        assert not body.startswith(b"data: ")
        chunks = [json.loads(c) for c in _sse(body, b"data:")]
        assert all(c["id"] == "a123" and c["model_name"] == "cogvlm2" and c["model_version"] is None for c in chunks)
        assert all("finish_reason" not in c["details"] for c in chunks[:-1])
        assert chunks[-1]["details"]["finish_reason"] in ("eos_token", "length", "stop_sequence")
        assert [c["details"]["generated_tokens"] for c in chunks] == list(range(1, len(chunks) + 1))
        assert chunks[0]["prefill_time"] is not None and chunks[0]["decode_time"] is None
        assert all(c["prefill_time"] is None and c["decode_time"] is not None for c in chunks[1:])
        assert "".join(c["text_output"] for c in chunks)
    else:
        obj = json.loads(body)
        assert obj["object"] == "chat.completion" and obj["model"] == "cogvlm2_llama3_video"
        assert obj["id"].startswith("endpoint_common_")
        choice = obj["choices"][0]
        assert choice["message"]["role"] == "assistant" and choice["message"]["tool_calls"] == []
        assert choice["finish_reason"] in ("stop", "length") and choice["logprobs"] is None
        usage = obj["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert usage["completion_tokens"] > 0 and usage["prompt_tokens_details"] == {"cached_tokens": 0}
        # max_tokens 8192 is capped by the context (max_seq_len 640), not refused.
        assert usage["total_tokens"] <= 640
        assert "If" not in choice["message"]["content"]


def test_seed_vllm_as_written_is_a_parse_error(server, clip):
    req = next(r for r in _seed_requests(clip) if r["name"] == "vllm_generate")
    status, body = _curl(server.base, "/generate", req["body_text_as_written"])
    assert status == 422
    assert json.loads(body) == {"error": GENERATE_PARSE, "error_type": "Input Validation Error"}


# -- stream framings ----------------------------------------------------------------------------------

def _tgi_body(text: str, video: str | None, **parameters) -> dict:
    inputs = [{"type": "text", "text": text}]
    if video:
        inputs.append({"type": "video_url", "video_url": video})
    return {"inputs": inputs, "parameters": parameters}


def test_vllm_stream_is_nul_terminated_json(server, clip):
    body = {"prompt": [{"type": "text", "text": "Describe."}, {"type": "video_url", "video_url": {"url": clip}}],
            "max_tokens": 12, "temperature": 0}
    full = server.client.post("/generate", json=body).json()["text"][0]
    raw = server.client.post("/generate", json={**body, "stream": True})
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
    assert raw.content.endswith(b"\0") and b"data:" not in raw.content and b"[DONE]" not in raw.content
    deltas = [json.loads(c)["text"][0] for c in raw.content[:-1].split(b"\0")]
    assert full == "Describe. " + "".join(deltas)


@pytest.mark.parity
def test_tgi_generate_stream_and_root(server, clip):
    body = _tgi_body("What happens?", clip, max_new_tokens=8, details=True, do_sample=False, seed=7)
    plain = server.client.post("/generate", json=body).json()
    assert list(plain) == ["details", "generated_text"]
    details = plain["details"]
    assert details["seed"] == 7 and details["generated_tokens"] == len(details["tokens"]) == 8
    assert details["prefill"] == [] and details["finish_reason"] == "length"
    token = details["tokens"][0]
    assert list(token) == ["id", "logprob", "special", "text"]
    assert isinstance(token["logprob"], float) and token["logprob"] <= 0
    assert token["special"] is False and isinstance(token["text"], str)

    raw = server.client.post("/generate_stream", json=body)
    chunks = [json.loads(c) for c in _sse(raw.content, b"data: ")]
    assert all(isinstance(c["token"]["id"], list) for c in chunks)
    assert all(c["generated_text"] is None and c["details"] is None for c in chunks[:-1])
    assert chunks[-1]["generated_text"] == plain["generated_text"] == "".join(c["token"]["text"] for c in chunks)
    assert chunks[-1]["details"] == {"prompt_tokens": details["prompt_tokens"], "finish_reason": "length",
                                     "generated_tokens": 8, "seed": 7}
    assert b"[DONE]" not in raw.content

    listed = server.client.post("/", json=body).json()
    assert listed == [plain]
    streamed = server.client.post("/", json={**body, "stream": True})
    assert streamed.content == raw.content

    full = server.client.post("/generate", json=_tgi_body("What happens?", clip, max_new_tokens=8,
                                                          return_full_text=True, decoder_input_details=True)).json()
    prefix = json.dumps(body["inputs"], separators=(",", ":")) + " "
    assert full["generated_text"] == prefix + plain["generated_text"]
    assert len(full["details"]["prefill"]) == details["prompt_tokens"]
    assert all(p["id"] >= 0 for p in full["details"]["prefill"])


# -- the official OpenAI client -----------------------------------------------------------------------

@pytest.mark.parity
def test_openai_client_chat_and_stream(server, clip):
    from openai import OpenAI

    client = OpenAI(base_url=server.base + "/v1", api_key="none")
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": clip}},
                                             {"type": "text", "text": "What is in the video?"}]}]
    kwargs = {"model": "cogvlm2", "messages": messages, "max_tokens": 10, "temperature": 0}
    completion = client.chat.completions.create(**kwargs)
    assert completion.object == "chat.completion"
    text = completion.choices[0].message.content
    assert text and completion.usage.completion_tokens == 10 and completion.choices[0].finish_reason == "length"

    stream = client.chat.completions.create(stream=True, **kwargs)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 10

    # The same video inline, as a data URL, gives the same answer.
    with open(clip, "rb") as file:
        data_url = "data:video/mp4;base64," + base64.b64encode(file.read()).decode()
    inline = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": data_url}},
                                           {"type": "text", "text": "What is in the video?"}]}]
    assert client.chat.completions.create(**{**kwargs, "messages": inline}).choices[0].message.content == text

    raw = server.client.post("/v1/chat/completions", json={**kwargs, "stream": True})
    assert raw.content.endswith(b"data: [DONE]\n\n")


# -- greedy answers: HTTP == offline runner; 16 concurrent streams == each alone --------------------

def test_greedy_answer_equals_offline_runner(server, chat_model_dir, clip, tmp_path):
    question = "What is the general content of this video?"
    results = tmp_path / "results.json"
    subprocess.run([sys.executable, "-m", "examples.models.cogvlm2_llama3_video.run_pa", "--model_path",
                    chat_model_dir, "--video_path", clip, "--input_texts", question, "--max_output_length", "24",
                    "--results_save_path", str(results)], cwd=REPO, check=True, capture_output=True, timeout=300)
    offline = json.loads(results.read_text())[0]
    http = server.client.post("/generate", json=_tgi_body(question, clip, max_new_tokens=24, do_sample=False,
                                                          details=True)).json()
    assert [t["id"] for t in http["details"]["tokens"]] == offline["output_token_ids"]
    assert http["generated_text"] == offline["output_text"]
    assert http["details"]["prompt_tokens"] == offline["prompt_tokens"]


def _stream_openai(base: str, body: dict) -> str:
    text = ""
    with httpx.stream("POST", base + "/v1/chat/completions", json={**body, "stream": True}, timeout=120) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
    return text


def test_sixteen_concurrent_streams_match_each_alone(server, clip):
    bodies = []
    for i in range(16):
        content = [{"type": "text", "text": f"Question number {i}: what do you see?"}]
        if i % 2 == 0:
            content.insert(0, {"type": "video_url", "video_url": clip})
        bodies.append({"model": "cogvlm2_llama3_video", "messages": [{"role": "user", "content": content}],
                       "max_tokens": 16, "temperature": 0, "ignore_eos": True})
    alone = [_stream_openai(server.base, b) for b in bodies]
    results: list[str | None] = [None] * 16
    errors = []

    def run(i):
        try:
            results[i] = _stream_openai(server.base, bodies[i])
        except Exception as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert results == alone


# -- validation: status and error body of each rule ---------------------------------------------------

def _err(message: str, status: int = 422) -> tuple[int, dict]:
    types = {404: "NotFoundError", 422: "Input Validation Error", 424: "Generation Error"}
    return status, {"error": message, "error_type": types[status]}


V = {"prompt": "hi"}
T = {"inputs": "hi"}
TR = {"text_input": "hi"}
OA = {"model": "cogvlm2", "messages": [{"role": "user", "content": "hi"}]}

VALIDATION = [
    # vLLM /generate, in the spec's check order.
    ("/generate", {"prompt": 5}, _err("The type of prompt is abnormal")),
    ("/generate", {"prompt": []}, _err("Prompt arr is empty")),
    ("/generate", {"prompt": ""}, _err(f"Prompt must be necessary and data type must be string and length in "
                                       f"(0, {MAX_CHARS}], but the length of inputs is 0")),
    ("/generate", {**V, "ignore_eos": "yes"}, _err("ignore_eos must be boolean type.")),
    ("/generate", {**V, "stop": 5}, _err("Input validation error: param stop must be string or list[string]")),
    ("/generate", {**V, "stop": [""]}, _err("Input validation error: the length of each string in param stop must "
                                           "be in [1, 1024], but got 0")),
    ("/generate", {**V, "stop_token_ids": [1.5]}, _err("Parameter stop_token_ids not list[int]")),
    ("/generate", {**V, "stop": "x", "include_stop_str_in_output": 1},
     _err("include_stop_str_in_output must be boolean type.")),
    ("/generate", {**V, "temperature": -0.5}, _err("Parameter temperature must be in (0.0,3.40282e+38], got -0.5.")),
    ("/generate", {**V, "temperature": "hot"}, _err("temperature must be float type.")),
    ("/generate", {**V, "top_k": 0}, _err("Parameter top_k must be in -1 || (0,2147483647], got 0")),
    ("/generate", {**V, "top_k": 20.0}, _err("Parameter top_k must be in -1 || (0,2147483647], got 20.0")),
    ("/generate", {**V, "top_p": 0}, _err("Parameter top_p must be in (0.0,1.0], got 0.")),
    ("/generate", {**V, "top_p": 1.5}, _err("Parameter top_p must be in (0.0,1.0], got 1.5.")),
    ("/generate", {**V, "seed": -1}, _err("Parameter seed must be in [0, 9223372036854775807], got -1.")),
    ("/generate", {**V, "repetition_penalty": 0},
     _err("Parameter 'repetition_penalty' must be in (0.0, 3.40282e+38], got 0.")),
    ("/generate", {**V, "frequency_penalty": 3}, _err("Parameter frequency_penalty should be in [-2.0, 2.0], got 3.")),
    ("/generate", {**V, "presence_penalty": -3},
     _err("Parameter presence_penalty not in [-2.0, 2.0], but got -3.")),
    ("/generate", {**V, "skip_special_tokens": 1}, _err("skip_special_tokens must be boolean type.")),
    ("/generate", {**V, "best_of": 0}, _err("Parameter [best_of] should be in [1, 128], got 0.")),
    ("/generate", {**V, "n": 2, "temperature": 0},
     _err("Best_of/N can not greater than 1 when temperature is 0 or not set, but best_of is None, n is 2.")),
    ("/generate", {**V, "model": 5}, _err("Model must be string type.")),
    ("/generate", {**V, "model": ""}, _err("Input validation error: length of `model` must be in [1, 256], but got 0")),
    ("/generate", {**V, "max_tokens": 0}, _err("Parameter max_tokens must be (0,2147483647], got 0")),
    ("/generate", {**V, "max_tokens": 20.0}, _err("Parameter max_tokens not number_integer")),
    ("/generate", {**V, "stream": "yes"}, _err("stream must be boolean type.")),
    ("/generate", {**V, "temperature": -1, "max_tokens": 0},
     _err("Parameter temperature must be in (0.0,3.40282e+38], got -1.")),
    ("/generate", {"neither": 1}, _err(GENERATE_PARSE)),
    # TGI
    ("/generate", {"inputs": 5}, _err("The type of inputs is abnormal")),
    ("/generate", {"inputs": []}, _err("Inputs arr is empty")),
    ("/generate", {"inputs": ""}, _err(f"Inputs length must be in (0, {MAX_CHARS}], but got 0")),
    ("/generate", {**T, "parameters": []}, _err("parameters must be object type.")),
    ("/generate", {**T, "parameters": {"stop": ["a"] * 1025}},
     _err("Input validation error: the number of stop strings must be no more than 1024, but got 1025")),
    ("/generate", {**T, "parameters": {"temperature": 0}},
     _err("Parameter temperature must be in (0.0,3.40282e+38], got 0.")),
    ("/generate", {**T, "parameters": {"top_k": 0}}, _err("Parameter top_k must be in (0,2147483647], got 0")),
    ("/generate", {**T, "parameters": {"top_k": -1}}, _err("Parameter top_k must be in (0,2147483647], got -1")),
    ("/generate", {**T, "parameters": {"top_p": 1.0}}, _err("Parameter top_p must be in (0.0,1.0], got 1.0.")),
    ("/generate", {**T, "parameters": {"typical_p": 0}}, _err("Parameter typical_p must be in (0.0,1.0], got 0.")),
    ("/generate", {**T, "parameters": {"do_sample": "no"}}, _err("do_sample must be boolean type.")),
    ("/generate", {**T, "parameters": {"seed": 1.5}},
     _err("Parameter seed must be in [0, 9223372036854775807], got 1.5.")),
    ("/generate", {**T, "parameters": {"watermark": 1}}, _err("watermark must be boolean type.")),
    ("/generate", {**T, "parameters": {"adapter_id": "bad id!"}}, _err("The format of adapter_id is invalid.")),
    ("/generate", {**T, "parameters": {"max_new_tokens": 0}},
     _err("Parameter max_new_tokens must be (0,2147483647], got 0")),
    ("/generate", {**T, "parameters": {"details": "x"}}, _err("details must be boolean type.")),
    ("/generate", {**T, "parameters": {"truncate": 0}}, _err("Parameter truncate must be in (0,2147483647], got 0")),
    ("/generate_stream", {**T, "parameters": {"decoder_input_details": True}},
     _err("The decoder_input_details must not be true when stream is true.")),
    ("/generate_stream", {"parameters": {}}, _err("Request should contain 'inputs' and the type should be string.")),
    ("/generate_stream", "[1]", _err("Failed to parse request context to json")),
    ("/", {**T, "stream": "yes"}, _err("stream must be boolean type.")),
    # Triton
    ("/v2/models/unknown/generate", TR, _err("Model unknown not found.", 404)),
    ("/v2/models/cogvlm2/generate", {**TR, "id": "bad id"},
     _err("The id can contain only digits, letters, underscores(_), hyphens(-) and no more than 256 words in length.")),
    ("/v2/models/cogvlm2/generate", {"id": "x"}, _err("The text_input not found")),
    ("/v2/models/cogvlm2/generate", {"text_input": []}, _err("Parameter text_input arr is empty")),
    ("/v2/models/cogvlm2/generate", {**TR, "parameters": {"top_k": -1}},
     _err("Parameter top_k must be in [0,2147483647], got -1")),
    ("/v2/models/cogvlm2/generate", {**TR, "parameters": {"priority": 6}},
     _err("Parameter priority must be in [1, 5], got 6")),
    ("/v2/models/cogvlm2/generate", {**TR, "parameters": {"batch_size": 0}},
     _err("Parameter batch_size must be in (0,2147483647], got 0")),
    ("/v2/models/cogvlm2/generate_stream", {**TR, "parameters": {"timeout": 0}},
     _err("Parameter timeout must be in (0, 65535], got 0")),
    # OpenAI
    ("/v1/chat/completions", {"messages": OA["messages"]}, _err("Request contains not model or model null")),
    ("/v1/chat/completions", {**OA, "model": 5}, _err("Request param model must be string")),
    ("/v1/chat/completions", {**OA, "model": ""}, _err("Request param model must be not empty")),
    ("/v1/chat/completions", {**OA, "model": "gpt-4"}, _err("Model not found")),
    ("/v1/chat/completions", {"model": "cogvlm2"}, _err("Request param contains not messages or messages null")),
    ("/v1/chat/completions", {**OA, "messages": []},
     _err("Request param contains not messages or messages not arr or arr is empty")),
    ("/v1/chat/completions", {**OA, "messages": [{"content": "hi"}]},
     _err("Request param contains not role or role null")),
    ("/v1/chat/completions", {**OA, "messages": [{"role": "user", "content": "hi"},
                                                {"role": "assistant", "content": [{"type": "text", "text": "a"}]},
                                                {"role": "user", "content": "more"}]},
     _err('Request param "content" arguments expected to be a string')),
    ("/v1/chat/completions", {**OA, "messages": [{"role": "user", "content": 5}]},
     _err("The type of inputs is abnormal")),
    ("/v1/chat/completions", {**OA, "temperature": -1}, _err("Parameter temperature must be in (0.0,3.40282e+38], "
                                                           "got -1.")),
    ("/v1/chat/completions", {**OA, "repetition_penalty": 2.5},
     _err("Parameter 'repetition_penalty' must be in (0.0, 2.0], got 2.5.")),
    ("/v1/chat/completions", {**OA, "top_k": 0}, _err("Parameter top_k must be in -1 || (0,2147483647], got 0")),
    ("/v1/chat/completions", {**OA, "max_tokens": -5}, _err("Parameter max_tokens must be (0,2147483647], got -5")),
    ("/v1/chat/completions", {**OA, "top_logprobs": 21}, _err("Parameter top logprobs must be in [0, 20], got 21.")),
    ("/v1/chat/completions", "{", _err("Failed to parse request context to json")),
    ("/v1/chat/completions", '{"model": NaN}', _err("Failed to parse request context to json")),
    # Content items (C++ pre-check and tokenizer rules).
    ("/generate", {"prompt": [{"type": "text", "text": 5}]}, _err("Request param text must be string")),
    ("/generate", {"prompt": [{"type": "video_url", "video_url": None}]}, _err("Request param video_url null")),
    ("/generate", {"prompt": [{"type": "video_url", "video_url": "/x.mp4"}] * 21},
     _err("The number of multimodal url should be no more than 20")),
    ("/generate", {"prompt": ["text"]}, _err("The input format is invalid, it should be a List[Dict].")),
    ("/generate", {"prompt": [{"type": "audio", "text": "a"}]},
     _err("[InferTokenizer::DownloadUrl] Download fail: Input type audio does not match the mm type.")),
    ("/generate", {"prompt": [{"text": "a"}]},
     _err("[InferTokenizer::DownloadUrl] Download fail: Input type None does not match the mm type.")),
]


@pytest.mark.parametrize(("path", "body", "expected"), VALIDATION,
                         ids=[f"{i}-{p}" for i, (p, _, _) in enumerate(VALIDATION)])
def test_validation_rules(server, path, body, expected):
    content = body if isinstance(body, str) else json.dumps(body)
    resp = server.client.post(path, content=content, headers={"Content-Type": "application/json"})
    assert (resp.status_code, resp.json()) == expected
    assert resp.headers["connection"] == "close"


def test_triton_accepts_its_own_ranges(server):
    # top_p 1.0 and top_k 0 are valid for Triton (not for TGI), and perf_stat / stream are ignored.
    resp = server.client.post("/v2/models/cogvlm2_llama3_video/generate",
                              json={**TR, "stream": True, "parameters": {"top_p": 1.0, "top_k": 0, "perf_stat": True,
                                                                         "max_new_tokens": 2, "timeout": 60}})
    assert resp.status_code == 200 and resp.json()["model_name"] == "cogvlm2_llama3_video"
    assert resp.json()["id"].startswith("endpoint_common_")


@pytest.mark.parametrize(("video", "fragment"), [
    ("{outside}", "Your input local file path is not allowed"),
    ("{media}/link.mp4", "symbolic links are not allowed"),
    ("{media}/missing.mp4", "the local video file does not exist"),
    ("{media}/notes.txt", "Input type video_url does not match the mm type."),
    ("http://example.com/a.mp4", "does not fetch media from the network"),
    ("https://example.com/a.mp4", "does not fetch media from the network"),
    ("data:video/mp4;base64,@@@", "the inline video is not valid base64"),
    ("data:image/png;base64,AAAA", "Input type video_url does not match the mm type."),
    ("relative/clip.mp4", "the local video path must be absolute"),
])
def test_bad_media_is_a_clear_422_and_the_server_keeps_serving(server, media_dir, clip, video, fragment):
    video = video.format(media=media_dir, outside=os.path.join(os.path.dirname(media_dir), "outside.mp4"))
    for path, body in [("/generate", {"prompt": [{"type": "text", "text": "a"},
                                                 {"type": "video_url", "video_url": video}]}),
                       ("/v1/chat/completions", {"model": "cogvlm2", "messages": [
                           {"role": "user", "content": [{"type": "video_url", "video_url": {"url": video}},
                                                        {"type": "text", "text": "a"}]}]})]:
        resp = server.client.post(path, json=body)
        assert resp.status_code == 422, resp.text
        error = resp.json()
        assert error["error_type"] == "Input Validation Error"
        assert error["error"].startswith("[InferTokenizer::DownloadUrl] Download fail: ") and fragment in error["error"]
    ok = server.client.post("/generate", json={"prompt": [{"type": "text", "text": "a"},
                                                          {"type": "video_url", "video_url": "file://" + clip}],
                                               "max_tokens": 2})
    assert ok.status_code == 200


def test_corrupt_video_image_and_two_videos_are_clear_422(server, media_dir, clip):
    corrupt = os.path.join(media_dir, "corrupt.mp4")
    resp = server.client.post("/generate", json=_tgi_body("a", corrupt))
    assert resp.status_code == 422
    assert resp.json()["error"].startswith("Inputs token length must be in (0, 1048576], but got 0 Cause: ")
    assert "corrupt.mp4" in resp.json()["error"]
    resp = server.client.post("/generate", json={"prompt": [{"type": "image_url", "image_url": {"url": clip}}]})
    assert resp.status_code == 422 and "image_url is not supported" in resp.json()["error"]
    with open(clip, "rb") as file:
        inline = "data:video/mp4;base64," + base64.b64encode(file.read()).decode()
    two = server.client.post("/v1/chat/completions", json={"model": "cogvlm2", "messages": [
        {"role": "user", "content": [{"type": "video_url", "video_url": clip},
                                     {"type": "video_url", "video_url": inline}]}]})
    assert two.status_code == 422 and two.json()["error"].startswith(TOKEN_MSG0 + " Cause: one video")
    assert server.client.post("/generate", json={"inputs": "still serving?",
                                                 "parameters": {"max_new_tokens": 2}}).status_code == 200


def test_prompt_too_long_is_424_and_max_tokens_is_capped(server):
    resp = server.client.post("/generate", json={"inputs": "word " * 800})
    assert resp.status_code == 424
    error = resp.json()
    assert error["error_type"] == "Generation Error"
    assert error["error"].startswith("Failed to enqueue inferRequest. This model's maximum input ids length cannot be "
                                     "greater than 639,the input ids length is ")
    capped = server.client.post("/v1/chat/completions", json={**OA, "max_tokens": 2_000_000_000, "ignore_eos": True,
                                                              "temperature": 0})
    assert capped.status_code == 200
    usage = capped.json()["usage"]
    # Capped by --max-iter-times (512, MindIE maxIterTimes) and by the context (640 tokens), not refused.
    assert usage["completion_tokens"] == min(512, 640 - usage["prompt_tokens"])
    assert capped.json()["choices"][0]["finish_reason"] == "length"


@pytest.mark.parity
def test_truncate_keeps_the_last_tokens_but_never_cuts_the_video(server, clip):
    long = server.client.post("/generate", json={"inputs": "one two three four five six seven eight",
                                                 "parameters": {"truncate": 4, "max_new_tokens": 1,
                                                                "decoder_input_details": True}})
    assert long.status_code == 200 and long.json()["details"]["prompt_tokens"] == 4
    resp = server.client.post("/generate", json=_tgi_body("a", clip, truncate=10))
    assert resp.status_code == 422 and "would cut into the video's vision tokens" in resp.json()["error"]


@pytest.mark.parity
def test_stop_strings_and_stop_token_ids(server):
    base = {"inputs": "Tell me a story.", "parameters": {"max_new_tokens": 12, "do_sample": False, "details": True}}
    plain = server.client.post("/generate", json=base).json()
    tokens = [t["id"] for t in plain["details"]["tokens"]]
    body = {"prompt": "Tell me a story.", "max_tokens": 12, "temperature": 0, "stop_token_ids": [tokens[3]]}
    stopped = server.client.post("/generate", json=body).json()["text"][0]
    assert len(stopped) < len("Tell me a story. " + plain["generated_text"])
    word = plain["generated_text"][len(plain["generated_text"]) // 2:][:3]
    if word.strip():
        cut = server.client.post("/generate", json={"prompt": "Tell me a story.", "max_tokens": 12,
                                                    "temperature": 0, "stop": word}).json()["text"][0]
        assert word not in cut[len("Tell me a story. "):]


def test_sampling_with_seed_is_reproducible(server, clip):
    body = {"model": "cogvlm2", "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 8,
            "temperature": 1.3, "top_p": 0.95, "top_k": 50, "seed": 1234, "presence_penalty": 0.5,
            "frequency_penalty": 0.5, "repetition_penalty": 1.2}
    first = server.client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    second = server.client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    assert first == second
    tgi = {"inputs": "Say something.", "parameters": {"do_sample": True, "temperature": 0.9, "typical_p": 0.5,
                                                      "seed": 99, "max_new_tokens": 8, "details": True}}
    a, b = (server.client.post("/generate", json=tgi).json() for _ in range(2))
    assert a == b and a["details"]["seed"] == 99


@pytest.mark.parity
def test_models_health_info_and_unknown_routes(server, chat_model_dir):
    models = server.client.get("/v1/models")
    assert models.text.startswith('{\n    "data": [')
    assert models.json() == {"object": "list", "data": [
        {"id": n, "object": "model", "owned_by": "MindIE Server", "parent": "null", "root": chat_model_dir}
        for n in ("cogvlm2_llama3_video", "cogvlm2")]}
    one = server.client.get("/v1/models/cogvlm2").json()
    assert set(one) == {"id", "object", "created", "owned_by"} and one["id"] == "cogvlm2"
    assert server.client.get("/v1/models/other").status_code == 404
    for path in ("/health", "/v2/health/ready", "/v2/health/live", "/v2/models/cogvlm2/ready"):
        resp = server.client.get(path)
        assert resp.status_code == 200 and resp.content == b""
    assert server.client.get("/v2/models/nope/ready").status_code == 404
    info = server.client.get("/info").json()
    assert info["max_concurrent_requests"] == 16 and info["max_input_length"] == 639 and info["max_best_of"] == 1
    assert info["models"][0]["max_total_tokens"] == 640
    assert info["models"][0]["model_pipeline_tag"] == "text-generation"
    missing = server.client.get("/no/such/route")
    assert missing.status_code == 404 and missing.content == b""


def test_body_too_large_is_413(server):
    resp = server.client.post("/generate", content=b"x" * (40 * 2**20 + 1))
    assert resp.status_code == 413
    assert resp.json() == {"message": "Request body too large. Maximum allowed size is 40MB."}


def test_client_disconnect_mid_stream_frees_blocks(server, clip):
    # Text-only prompts leave room for 600 tokens (the server's --max-seq-len is 640), so the stream is still
    # running when the first chunk is read, however fast the machine decodes.
    for path, body in [
        ("/generate_stream", _tgi_body("Go on.", None, max_new_tokens=600)),
        ("/v1/chat/completions", {**OA, "stream": True, "max_tokens": 600, "ignore_eos": True}),
    ]:
        with httpx.stream("POST", server.base + path, json=body, timeout=60) as resp:
            assert resp.status_code == 200
            chunks = resp.iter_raw()
            # OpenAI's role chunk may come before the engine schedules the request; a token chunk cannot.
            seen = [next(chunks), next(chunks)]
            resources = server.resources()
            assert resources["kv_blocks_free"] < resources["kv_blocks_total"], (path, seen, resources)
        server.wait_idle()
    # A non-streaming client that gives up is aborted too, while its tokens keep coming: the engine stops well
    # short of the 500 steps the request asked for (it used to run them all).
    steps_before = server.resources()["engine_steps"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base + "/v1/chat/completions", json={**OA, "max_tokens": 500, "ignore_eos": True},
                   timeout=0.3)
    assert server.wait_idle()["engine_steps"] - steps_before < 500


@pytest.mark.parity
def test_follow_up_on_a_video_skips_decoding(server, clip, media_dir):
    """The same video asked about again (here under another name: the identity is its content) is neither decoded
    nor written to shared memory, and the prompt's cached KV blocks are reused; /debug/resources shows both."""
    copy = os.path.join(media_dir, "follow_up.mp4")
    shutil.copy(clip, copy)

    def ask(path: str) -> str:
        body = {"model": "cogvlm2", "max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": path}, {"type": "text", "text": "What is in this clip?"}]}]}
        resp = server.client.post("/v1/chat/completions", json=body)
        assert resp.status_code == 200, resp.text
        return resp.json()["choices"][0]["message"]["content"]

    first = ask(clip)
    before = server.wait_idle()
    again = ask(copy)
    after = server.wait_idle()
    assert again == first
    assert after["released_shm_segments"] == before["released_shm_segments"], "the follow-up wrote shared memory"
    assert after["vision_cache"]["hits"] > before["vision_cache"]["hits"]
    assert after["prefix_cache"]["hits"] > before["prefix_cache"]["hits"]
    assert after["prefix_cache"]["queries"] > before["prefix_cache"]["queries"]


def test_zz_everything_released(server):
    """Runs last in this module: no KV block, request resource or shared-memory segment is left."""
    res = server.wait_idle()
    assert res["released_shm_segments"], "the tests should have created shared memory"
    left = [n for n in res["released_shm_segments"] if os.path.exists(os.path.join("/dev/shm", n))]
    assert not left


# -- a small server: full queue, timeouts, SIGTERM ----------------------------------------------------

@pytest.fixture(scope="module")
def long_context_model_dir(tmp_path_factory) -> str:
    """A demo checkpoint with a long context, so one request can keep the only batch slot busy for many
    seconds however fast this machine decodes."""
    from atb_llm.demo.make_demo import make_demo_checkpoint

    return make_demo_checkpoint(str(tmp_path_factory.mktemp("long_model")), seed=1, shards=1,
                                overrides={"max_position_embeddings": 32768})


def test_queue_full_timeouts_and_sigterm(long_context_model_dir, media_dir, clip):
    srv = Server(long_context_model_dir, media_dir, "--max-batch-size", "1", "--max-queue", "1", "--max-seq-len",
                 "32768", "--max-iter-times", "32000")
    try:
        # ~30k tokens: tens of seconds on any CPU; the test ends it early by closing the stream.
        long_body = {"prompt": "Count forever.", "max_tokens": 30000, "ignore_eos": True, "stream": True,
                     "temperature": 0}
        with httpx.stream("POST", srv.base + "/generate", json=long_body, timeout=60) as running:
            chunks = running.iter_raw()  # keep a reference: a discarded iterator closes the connection
            next(chunks)
            waiting: dict = {}
            thread = threading.Thread(target=lambda: waiting.update(resp=srv.client.post(
                "/v2/models/cogvlm2/generate", json={**TR, "parameters": {"timeout": 20, "max_new_tokens": 5}})))
            # Its timeout must outlast the checks below, which a loaded CI box can stretch to seconds.
            thread.start()
            deadline = time.monotonic() + 60  # a bound on a hang, not a speed check: a loaded CI box can be slow
            while srv.resources()["requests_waiting"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            full = srv.client.post("/generate", json={"inputs": "hi"})
            assert full.status_code == 503 and full.headers["retry-after"] == "1"
            assert full.json()["error_type"] == "Service Unavailable" and "queue is full" in full.json()["error"]
            assert srv.client.get("/v2/health/ready").status_code == 503
            assert srv.client.get("/v2/health/live").json() == {"message": "Service is alive but busy"}
            thread.join(60)
            assert waiting["resp"].status_code == 500
            assert waiting["resp"].json() == {"error": "Engine callback timeout: client timeout",
                                              "error_type": "Incomplete Generation"}
            while srv.resources()["requests_waiting"]:  # the timed-out request leaves at the next step
                time.sleep(0.01)
            stream_timeout = srv.client.post("/v2/models/cogvlm2/generate_stream",
                                             json={**TR, "parameters": {"timeout": 1}})
            assert stream_timeout.status_code == 200
            assert stream_timeout.content == (b'data:{"error":"Engine callback timeout: client timeout",'
                                              b'"error_type":"Incomplete Generation"}\n\n')
        srv.wait_idle()
        # SIGTERM with a request in flight: its stream ends, everything is released, exit code 0.
        video_chat = {"model": "cogvlm2", "stream": True, "max_tokens": 1500, "ignore_eos": True, "messages": [
            {"role": "user", "content": [{"type": "video_url", "video_url": clip}, {"type": "text", "text": "Go."}]}]}
        with httpx.stream("POST", srv.base + "/v1/chat/completions", json=video_chat, timeout=60) as resp:
            lines = resp.iter_lines()
            next(lines)
            segments_before = srv.resources()["active_shm_segments"]
            assert segments_before
            start = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            rest = list(lines)
        assert any("The service has been stopped" in line for line in rest)
        assert srv.proc.wait(15) == 0
        assert time.monotonic() - start < 30  # a bound on a hang (the drain is immediate), not a speed check
        assert not [n for n in segments_before if os.path.exists(os.path.join("/dev/shm", n))]
    finally:
        srv.stop()
