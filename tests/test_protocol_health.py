"""Health probes and /info (service/protocols/health.py), in process."""
from __future__ import annotations

from tests.inprocess import error


def test_probes_and_info(inproc):
    for path in ("/health", "/v2/health/ready", "/v2/health/live", "/v2/models/cogvlm2/ready"):
        resp = inproc.get(path)
        assert (resp.status_code, resp.content) == (200, b""), path
    missing = inproc.get("/v2/models/other/ready")
    assert (missing.status_code, missing.json()) == error("Model other not found.", 404)
    info = inproc.get("/info").json()
    assert info["max_concurrent_requests"] == 16 and info["max_input_length"] == inproc.service.max_input_length
    assert [m["model_id"] for m in info["models"]] == ["cogvlm2_llama3_video", "cogvlm2"]
    assert all(m["max_total_tokens"] == 640 for m in info["models"])


def test_unknown_routes_and_methods_are_empty(inproc):
    assert (inproc.get("/nope").status_code, inproc.get("/nope").content) == (404, b"")
    wrong = inproc.get("/generate")
    assert (wrong.status_code, wrong.content) == (405, b"")
