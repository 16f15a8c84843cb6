"""The hostile media corpus (tests/hostile_media.py) against the decoder: real videos in every accepted
container are read; damaged files, decompression bombs, playlists, concat lists, path tricks, FIFOs and
devices are refused with a clear error, before any decoder opens another file, within bounded memory."""
import dataclasses
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from atb_llm.models.cogvlm2_llama3_video import data_preprocess_cogvlm2_llama3_video as vp
from tests.hostile_media import atime_detects_reads, build_corpus, read_canaries

ROOT = Path(__file__).resolve().parent.parent
# The worst case of the corpus must stay far below what the bombs would take to decode (an 8K frame alone is
# 100 MB of RGB, a 2 x 4000 needle resized for the model 1.2 GB): the decoder process, torch included.
PEAK_RSS_LIMIT_MB = 600
# The server with the tiny model loaded, after the whole corpus (the bombs alone would need gigabytes).
SERVER_PEAK_RSS_LIMIT_MB = 800


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    cases, canaries = build_corpus(root / "allowed", root / "outside")
    cases_file = root / "cases.json"
    cases_file.write_text(json.dumps([dataclasses.asdict(c) for c in cases]), encoding="utf-8")
    return {"root": root, "cases": cases, "canaries": canaries, "file": cases_file}


def test_corpus_is_broad(corpus):
    kinds = Counter(case.kind for case in corpus["cases"])
    assert len(corpus["cases"]) >= 40
    assert set(kinds) == {"container", "damaged", "bomb", "playlist", "path", "device", "inline"}
    assert kinds["playlist"] >= 8 and kinds["container"] >= 8


def test_every_case_is_read_or_refused_as_expected(corpus):
    root = corpus["root"]
    proc = subprocess.run([sys.executable, "-m", "tests.hostile_media", str(corpus["file"]), str(root / "allowed"),
                           str(root / "scratch")], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    wrong = {name: r for name, r in report["results"].items() if r["got"] != r["expect"]}
    assert not wrong, json.dumps(wrong, indent=1)
    for name, result in report["results"].items():
        if result["got"] == "refused":
            assert result["message"].strip(), f"{name}: refused without a reason"
    playlists = [r for r in report["results"].values() if r["kind"] == "playlist"]
    assert all("not a video container" in r["message"] for r in playlists), "a playlist reached a decoder"
    assert report["peak_rss_kb"] / 1024 < PEAK_RSS_LIMIT_MB, f"peak RSS {report['peak_rss_kb'] // 1024} MB"
    if not atime_detects_reads(root):
        pytest.skip("this filesystem does not update access times: reads outside the allowed dir are not observable")
    assert read_canaries(corpus["canaries"]) == [], "a file outside the allowed directory was read"


@pytest.mark.parametrize(("head", "demuxer"), [
    (b"\x00\x00\x00\x18ftypisom", "mov"), (b"\x1a\x45\xdf\xa3" + bytes(8), "matroska"),
    (b"RIFF\x00\x00\x00\x00AVI LIST", "avi"), (bytes.fromhex("3026b2758e66cf11a6d900aa0062ce6c"), "asf"),
    (b"FLV\x01\x05" + bytes(7), "flv"), ((b"\x47" + bytes(187)) * 3, "mpegts"),
    (b"\x00\x00\x01\xba" + bytes(8), "mpeg"),
    (b"#EXTM3U\n#EXTINF:1,\nx.ts\n", None), (b"ffconcat version 1.0\n", None), (b"\xef\xbb\xbf#EXTM3U\n", None),
    (b"v=0\no=- 0 0 IN IP4 1.2.3.4\n", None), (b"RIFF\x00\x00\x00\x00WAVEfmt ", None), (b"\x47" + bytes(30), None),
    (b"", None),
])
def test_sniff_container(head, demuxer):
    assert vp.sniff_container(head) == demuxer


def test_pixel_limit_is_configurable(corpus):
    video = str(corpus["root"] / "allowed" / "real_libx264_mp4.mp4")  # 96 x 64
    assert vp.load_video(video, max_pixels=96 * 64).shape[1:] == (3, 224, 224)
    with pytest.raises(vp.VideoError, match="more than the limit of 6143"):
        vp.load_video(video, max_pixels=96 * 64 - 1)


@pytest.fixture(scope="module")
def corpus_server(chat_model_dir, corpus):
    from tests.test_service import Server

    srv = Server(chat_model_dir, str(corpus["root"] / "allowed"), "--max-iter-times", "2", "--max-seq-len", "2048",
                 "--max-input-length", "1900", "--enable-debug-routes")
    yield srv
    assert srv.stop() == 0, srv.output()


def test_the_service_answers_or_refuses_every_case(corpus, corpus_server):
    """The same corpus over OpenAI chat: 200 for real videos, a 4xx naming the problem otherwise, never a 5xx,
    no file outside the allowed directory read, and nothing left behind."""
    statuses = {}
    for case in corpus["cases"]:
        body = {"model": "cogvlm2", "max_tokens": 2, "messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": case.video}}, {"type": "text", "text": "What happens?"}]}]}
        response = corpus_server.client.post("/v1/chat/completions", json=body)
        statuses[case.name] = response.status_code
        if case.expect == "ok":
            assert response.status_code == 200, f"{case.name}: {response.text[:300]}"
        else:
            assert 400 <= response.status_code < 500, f"{case.name}: {response.status_code} {response.text[:300]}"
            error = response.json()["error"]
            assert error and "Traceback" not in error
            if case.kind == "inline":  # the server's temp file is not the client's business
                assert "cogvlm2-svc" not in error and "/tmp" not in error, f"{case.name}: {error}"
    assert corpus_server.client.get("/health").status_code == 200
    corpus_server.wait_idle()
    with open(f"/proc/{corpus_server.proc.pid}/status", encoding="ascii") as status:
        peak_mb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    print(f"server peak RSS over the corpus: {peak_mb:.0f} MB")
    assert peak_mb < SERVER_PEAK_RSS_LIMIT_MB
    if atime_detects_reads(corpus["root"]):
        assert read_canaries(corpus["canaries"]) == [], "a file outside the allowed directory was read"
    print(json.dumps(statuses))


def test_max_video_pixels_flag(chat_model_dir, corpus):
    """--max-video-pixels lowers the frame limit for the service; the refusal names it."""
    from tests.test_service import Server

    srv = Server(chat_model_dir, str(corpus["root"] / "allowed"), "--max-video-pixels", str(96 * 64 - 1),
                 "--max-iter-times", "2")
    try:
        body = {"model": "cogvlm2", "max_tokens": 2, "messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": str(corpus["root"] / "allowed" / "real_libx264_mp4.mp4")},
            {"type": "text", "text": "What happens?"}]}]}
        response = srv.client.post("/v1/chat/completions", json=body)
        assert response.status_code == 422 and "more than the limit of 6143" in response.json()["error"]
    finally:
        assert srv.stop() == 0, srv.output()
