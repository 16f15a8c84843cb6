"""Property-based fuzzing of every route of the running service: no input gets a 5xx.

Hypothesis mutates a valid body of each route (fields replaced by arbitrary JSON, removed, or added) and
also sends raw bytes, deep nesting, lone surrogates, NUL bytes and huge numbers. Whatever arrives, the answer
is a 2xx or a 4xx (a 503 only for a full queue, which these small loads never reach), and afterwards the
server is healthy with every KV block free and no shared memory left. A few hundred bodies per run, derandomized so
CI is reproducible; the server generates at most 4 tokens per request to keep it fast.
"""
from __future__ import annotations

import json
import os
import shutil

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_service import Server

MODEL = "cogvlm2"
SETTINGS = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def fuzz_media(tmp_path_factory, video_3_frames) -> dict:
    root = tmp_path_factory.mktemp("fuzz_media")
    allowed = root / "allowed"
    allowed.mkdir()
    shutil.copy(video_3_frames, allowed / "clip.mp4")
    shutil.copy(video_3_frames, root / "outside.mp4")
    return {"dir": str(allowed), "clip": str(allowed / "clip.mp4"), "outside": str(root / "outside.mp4")}


@pytest.fixture(scope="module")
def fuzz_server(chat_model_dir, fuzz_media):
    srv = Server(chat_model_dir, fuzz_media["dir"], "--max-iter-times", "4", "--max-seq-len", "512",
                 "--max-batch-size", "8", "--enable-debug-routes")
    yield srv
    assert srv.stop() == 0, srv.output()


def base_bodies(clip: str) -> dict[str, dict]:
    video = [{"type": "text", "text": "what happens?"}, {"type": "video_url", "video_url": clip}]
    return {
        "/generate": {"prompt": video, "max_tokens": 4, "temperature": 0.6, "top_k": 1, "stream": False},
        "/generate#tgi": {"inputs": "hello", "parameters": {"max_new_tokens": 4, "do_sample": False}},
        "/generate_stream": {"inputs": video, "parameters": {"max_new_tokens": 4, "details": True}},
        "/": {"inputs": "hello", "parameters": {"max_new_tokens": 4}, "stream": False},
        f"/v2/models/{MODEL}/generate": {"id": "a1", "text_input": video, "parameters": {"max_new_tokens": 4}},
        f"/v2/models/{MODEL}/generate_stream": {"id": "a2", "text_input": "hi", "parameters": {"max_new_tokens": 4}},
        "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": video}], "max_tokens": 4},
        "/v1/completions": {"model": MODEL, "prompt": "hello", "max_tokens": 4, "logprobs": 2},
        "/infer": {"inputs": video, "stream": False, "parameters": {"max_new_tokens": 4}},
        f"/v2/models/{MODEL}/infer": {"id": "t1", "inputs": [{"name": "input0", "shape": [1, 3], "datatype": "UINT32",
                                                              "data": [128000, 9906, 1917],
                                                              "parameters": {"max_new_tokens": 4}}],
                                      "outputs": [{"name": "output0"}]},
        f"/v2/models/{MODEL}/stopInfer": {"id": "nobody"},
    }


ROUTES = list(base_bodies("clip.mp4"))

scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats()
           | st.text(max_size=40)
           | st.sampled_from(["", "\x00", "\ud800", "NaN", "-1", "1e999", "data:video/mp4;base64,AAAA",
                              "file:///etc/passwd", "../../x.mp4", "http://127.0.0.1:9/x.mp4"]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=16)


def mutate(base: dict, keys: list[str]):
    """A base body with some fields replaced by arbitrary JSON, some removed, some added (also inside the
    first nested object, where the sampling parameters live)."""
    nested = [k for k, v in base.items() if isinstance(v, dict)]
    nested_keys = sorted({k for name in nested for k in base[name]})
    field = st.sampled_from(keys) | st.text(max_size=10)

    def build(replace, drop, inner):
        body = json.loads(json.dumps(base))
        for key in drop:
            body.pop(key, None)
        body.update(replace)
        for name in nested:
            if isinstance(body.get(name), dict):
                body[name].update(inner)
        return body

    return st.builds(build, st.dictionaries(field, json_values, max_size=3),
                     st.lists(st.sampled_from(keys), max_size=2),
                     st.dictionaries(st.sampled_from(nested_keys or ["x"]) | st.text(max_size=8), json_values,
                                     max_size=3))


def post(server: Server, route: str, content: bytes) -> httpx.Response:
    path = route.split("#")[0]
    return server.client.post(path, content=content, headers={"Content-Type": "application/json"}, timeout=120)


def check(response: httpx.Response, what: str) -> None:
    assert response.status_code < 500 or (response.status_code == 503 and "Retry-After" in response.headers), (
        f"{what}: {response.status_code} {response.text[:500]}")


@pytest.mark.parametrize("route", ROUTES)
def test_mutated_bodies_never_get_a_5xx(fuzz_server, fuzz_media, route):
    base = base_bodies(fuzz_media["clip"])[route]
    keys = sorted(base)

    @SETTINGS
    @given(mutate(base, keys))
    def run(body):
        content = json.dumps(body, ensure_ascii=True, allow_nan=True).encode()
        check(post(fuzz_server, route, content), f"{route} {content[:300]!r}")

    run()


hostile_raw = st.one_of(
    st.binary(max_size=300),
    st.integers(1, 6000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.integers(1, 6000).map(lambda depth: b'{"a":' * depth + b"1" + b"}" * depth),
    st.sampled_from([b'{"prompt": "\\ud800", "max_tokens": 4}', b'{"inputs": "a\\u0000b"}',
                     b'{"prompt": "x", "max_tokens": 1e999}', b"\xff\xfe{}", b'{"prompt": "x"' + b" " * 2000,
                     b'{"messages": [{"role": "user", "content": [{"type": "video_url", '
                     b'"video_url": "/a\\u0000.mp4"}]}]}',
                     b"null", b"[]", b'"a string"', b"{}", b"", b"{" * 100000]),
)


@pytest.mark.parametrize("route", ROUTES)
def test_raw_bodies_never_get_a_5xx(fuzz_server, route):
    @settings(max_examples=12, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(hostile_raw)
    def run(content):
        check(post(fuzz_server, route, content), f"{route} {content[:200]!r}")

    run()


def test_server_is_healthy_and_idle_after_fuzzing(fuzz_server):
    assert fuzz_server.client.get("/health").status_code == 200
    fuzz_server.wait_idle()
    leftover = [name for name in fuzz_server.resources()["active_shm_segments"] if os.path.exists(f"/dev/shm/{name}")]
    assert leftover == []
