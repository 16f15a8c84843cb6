"""GET /metrics (service/metrics.py) and the request id / JSON access log (service/observe.py), in process."""
from __future__ import annotations

import json
import logging
import os

import pytest
from prometheus_client.parser import text_string_to_metric_families


def scrape(inproc) -> dict[str, float]:
    """Every sample of /metrics by name and sorted labels: {"name{k=v,...}": value}."""
    resp = inproc.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def delta(before: dict, after: dict, key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_token_latency_and_error_metrics_move_with_requests(inproc):
    inproc.wait_idle()
    before = scrape(inproc)
    ids = inproc.service.encode_plain("metrics please")
    body = {"model": "cogvlm2", "prompt": ids, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    resp = inproc.post("/v1/completions", body)
    assert resp.status_code == 200
    stream = inproc.post("/v1/completions", {**body, "stream": True})
    assert stream.status_code == 200
    assert inproc.post("/generate", {"prompt": 5}).status_code == 422
    assert inproc.post("/v2/models/nope/generate", {"text_input": "x"}).status_code == 404
    inproc.wait_idle()
    after = scrape(inproc)
    assert delta(before, after, "cogvlm2:prompt_tokens_total{}") == 2 * len(ids)
    assert delta(before, after, "cogvlm2:generation_tokens_total{}") == 8  # ignore_eos: 4 tokens each
    assert delta(before, after, "cogvlm2:time_to_first_token_seconds_count{}") == 2
    assert delta(before, after, "cogvlm2:inter_token_latency_seconds_count{}") == 6  # 3 gaps per sequence
    assert delta(before, after, "cogvlm2:e2e_request_latency_seconds_count{}") == 2
    assert delta(before, after, "cogvlm2:e2e_request_latency_seconds_sum{}") > 0
    assert delta(before, after, "cogvlm2:request_success_total{finished_reason=length}") == 2
    assert delta(before, after, "cogvlm2:http_request_errors_total{route=/generate,status_class=4xx}") == 1
    assert delta(before, after,
                 "cogvlm2:http_request_errors_total{route=/v2/models/{model}/generate,status_class=4xx}") == 1
    assert delta(before, after, "cogvlm2:http_request_errors_total{route=/v1/completions,status_class=4xx}") == 0
    assert after["cogvlm2:num_requests_running{}"] == 0 and after["cogvlm2:num_requests_waiting{}"] == 0
    blocks = inproc.service.engine.blocks  # idle: only blocks the prefix cache keeps count as used
    assert after["cogvlm2:kv_cache_usage_perc{}"] == pytest.approx((blocks.num_blocks - blocks.num_free)
                                                                   / blocks.num_blocks)
    # The prefix cache saw both prompts' tokens; the second found the first's full blocks (if any).
    assert delta(before, after, "cogvlm2:prefix_cache_queries_total{}") >= len(ids)


def test_vision_cache_counters_count_a_follow_up(inproc, inproc_media):
    clip = os.path.join(inproc_media, "clip.mp4")
    inproc.wait_idle()
    before = scrape(inproc)
    items = [{"type": "video_url", "video_url": clip}, {"type": "text", "text": "Q?"}]
    for question in ("What?", "Why?"):
        items[1]["text"] = question
        assert inproc.post("/generate", {"prompt": items, "max_tokens": 2}).status_code == 200
    after = scrape(inproc)
    queries = delta(before, after, "cogvlm2:vision_cache_queries_total{}")
    hits = delta(before, after, "cogvlm2:vision_cache_hits_total{}")
    assert queries >= 2 and hits >= 1 and hits <= queries


def test_request_id_is_echoed_or_generated_and_logged(inproc, caplog):
    with caplog.at_level(logging.INFO, logger="service.access"):
        echoed = inproc.get("/health", headers={"X-Request-Id": "client-42"})
        fresh = inproc.get("/health")
        odd = inproc.get("/health", headers={"X-Request-Id": "has space\tand tab"})
        failed = inproc.post("/generate", {"prompt": 5}, headers={"X-Request-Id": "bad-1"})
    assert echoed.headers["x-request-id"] == "client-42"
    assert len(fresh.headers["x-request-id"]) == 32 and fresh.headers["x-request-id"] != "client-42"
    assert odd.headers["x-request-id"] != "has space\tand tab" and len(odd.headers["x-request-id"]) == 32
    assert failed.headers["x-request-id"] == "bad-1"
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "service.access"]
    by_id = {line["request_id"]: line for line in lines}
    assert by_id["client-42"]["status"] == 200 and by_id["client-42"]["route"] == "/health"
    assert by_id["bad-1"]["status"] == 422 and by_id["bad-1"]["method"] == "POST"
    assert by_id[fresh.headers["x-request-id"]]["path"] == "/health"
    assert all(line["duration_ms"] >= 0 for line in lines)


def test_the_observing_layer_counts_5xx_and_logs_failures(caplog):
    """Observe in isolation: an app that fails with a 500, one that raises, and an unknown path."""
    import asyncio

    import httpx

    from service.metrics import Metrics
    from service.observe import Observe

    async def app(scope, receive, send):
        if scope["path"] == "/raise":
            raise RuntimeError("boom")
        status = 500 if scope["path"] == "/v2/models/m/generate" else 404
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"x"})

    metrics = Metrics()
    observed = Observe(app, metrics, ["/v2/models/{model}/generate", "/raise"])

    async def calls():
        transport = httpx.ASGITransport(app=observed, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            failed = await client.post("/v2/models/m/generate", headers={"X-Request-Id": "r-1"})
            await client.get("/raise")
            await client.get("/nowhere")
            return failed

    with caplog.at_level(logging.INFO, logger="service.access"):
        failed = asyncio.run(calls())
    assert failed.status_code == 500 and failed.headers["x-request-id"] == "r-1"
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(metrics.exposition().decode()) for s in f.samples}
    errors = "cogvlm2:http_request_errors_total"
    assert samples[(errors, (("route", "/v2/models/{model}/generate"), ("status_class", "5xx")))] == 1
    assert samples[(errors, (("route", "/raise"), ("status_class", "5xx")))] == 1
    assert samples[(errors, (("route", "unmatched"), ("status_class", "4xx")))] == 1
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "service.access"]
    assert [(line["route"], line["status"]) for line in lines] == [("/v2/models/{model}/generate", 500),
                                                                   ("/raise", 500), ("unmatched", 404)]
