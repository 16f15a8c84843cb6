"""http(s) video URLs from allowed domains (service/fetch.py), against a local http.server on 127.0.0.1."""
from __future__ import annotations

import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from service.errors import ApiError
from service.fetch import MediaFetcher

PREFIX = "[InferTokenizer::DownloadUrl] Download fail: "


@pytest.fixture(scope="module")
def origin(video_6_frames):
    """A local web server: the clip, redirects, an oversized body (declared or not), a slow body, a 404."""
    with open(video_6_frames, "rb") as file:
        clip = file.read()
    requests: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None):
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if "Content-Length" not in (headers or {}):
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            requests.append(self.path)
            port = self.server.server_address[1]
            if self.path == "/clip.mp4":
                self._send(200, clip, {"Content-Type": "video/mp4"})
            elif self.path == "/hop":
                self._send(302, headers={"Location": "/clip.mp4"})
            elif self.path == "/to-localhost":
                self._send(302, headers={"Location": f"http://localhost:{port}/clip.mp4"})
            elif self.path == "/away":
                self._send(302, headers={"Location": "http://media.invalid/clip.mp4"})
            elif self.path == "/loop":
                self._send(302, headers={"Location": "/loop"})
            elif self.path == "/declared-big":
                self._send(200, b"x" * 16, {"Content-Length": str(64 << 20)})
            elif self.path == "/undeclared-big":
                self.send_response(200)
                self.send_header("Connection", "close")
                self.end_headers()
                for _ in range(64):
                    self.wfile.write(b"x" * 65536)
            elif self.path == "/slow":
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                try:
                    for _ in range(50):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        time.sleep(0.1)
                except OSError:
                    pass
            else:
                self._send(404, b"no")

    class Quiet(ThreadingHTTPServer):
        def handle_error(self, request, client_address):
            pass  # a client that gave up (size cap, time limit) breaks the pipe: expected

    server = Quiet(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", requests, clip
    server.shutdown()
    server.server_close()


def _fails(fetcher: MediaFetcher, url: str, tmp_path) -> str:
    with pytest.raises(ApiError) as failed:
        fetcher.fetch(url, str(tmp_path), "v")
    assert failed.value.status == 422 and failed.value.message.startswith(PREFIX)
    return failed.value.message[len(PREFIX):]


def test_downloads_follow_checked_redirects(origin, tmp_path):
    base, requests, clip = origin
    fetcher = MediaFetcher(["127.0.0.1"], max_bytes=1 << 20, timeout=10)
    path = fetcher.fetch(base + "/hop", str(tmp_path), "v")
    assert path == str(tmp_path / "v.mp4") and Path(path).read_bytes() == clip
    assert requests[-2:] == ["/hop", "/clip.mp4"]
    assert _fails(fetcher, base + "/away", tmp_path) == "the host media.invalid is not an allowed media domain of " \
                                                         "this server"
    assert _fails(fetcher, base + "/loop", tmp_path) == "more than 5 redirects"
    assert _fails(fetcher, base + "/missing.mp4", tmp_path) == "the server answered HTTP 404"


def test_private_addresses_need_an_explicit_allowance(origin, tmp_path):
    base, _, clip = origin
    port = base.rsplit(":", 1)[1]
    by_name = MediaFetcher(["localhost"], timeout=10)
    message = _fails(by_name, f"http://localhost:{port}/clip.mp4", tmp_path)
    assert message.startswith("the host localhost resolves to a non-public address (")
    # The literal address on the list allows it, and a redirect to another name is checked again.
    literal = MediaFetcher(["127.0.0.1"], timeout=10)
    assert _fails(literal, base + "/to-localhost", tmp_path) == ("the host localhost is not an allowed media domain "
                                                                 "of this server")
    opened = MediaFetcher(["localhost", "127.0.0.1"], allow_private=True, timeout=10)
    assert Path(opened.fetch(base + "/to-localhost", str(tmp_path), "w")).read_bytes() == clip


def test_size_and_time_limits(origin, tmp_path):
    base, _, _ = origin
    fetcher = MediaFetcher(["127.0.0.1"], max_bytes=1 << 20, timeout=1.0)
    assert _fails(fetcher, base + "/declared-big", tmp_path) == ("the video has 67108864 bytes, more than the "
                                                                 "limit of 1048576")
    assert _fails(fetcher, base + "/undeclared-big", tmp_path) == "the video is larger than the limit of 1048576 bytes"
    start = time.monotonic()
    assert _fails(fetcher, base + "/slow", tmp_path) == "the download did not finish within 1 s"
    assert time.monotonic() - start < 3
    for url, reason in [("ftp://127.0.0.1/x.mp4", "only http and https URLs can be fetched, got ftp"),
                        ("http://user:pw@127.0.0.1/x.mp4", "credentials in media URLs are not accepted"),
                        ("http://127.0.0.1:99999/x.mp4", "the media URL has an invalid port"),
                        ("https://example.com/x.mp4", "the host example.com is not an allowed media domain of this "
                                                      "server")]:
        assert _fails(fetcher, url, tmp_path) == reason


def test_subdomain_entries():
    fetcher = MediaFetcher([".example.com", "Videos.Example.org."])
    assert fetcher.host_allowed("example.com") and fetcher.host_allowed("cdn.example.com")
    assert fetcher.host_allowed("videos.example.org")
    assert not fetcher.host_allowed("badexample.com") and not fetcher.host_allowed("cdn.videos.example.org")


def test_a_chat_request_with_an_allowed_url_matches_the_local_file(origin, inproc, inproc_media, monkeypatch):
    """The shared in-process service with the fetcher --allowed-media-domain 127.0.0.1 gives it."""
    base, _, _ = origin
    monkeypatch.setattr(inproc.service, "fetcher", MediaFetcher(["127.0.0.1"], timeout=10))

    def ask(url: str):
        content = [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "What?"}]
        return inproc.post("/v1/chat/completions", {"model": "cogvlm2", "max_tokens": 4, "temperature": 0,
                                                     "messages": [{"role": "user", "content": content}]})

    remote = ask(base + "/clip.mp4")
    local = ask(os.path.join(inproc_media, "clip.mp4"))
    assert remote.status_code == 200, remote.text
    assert remote.json()["choices"] == local.json()["choices"]
    assert remote.json()["usage"] == local.json()["usage"]
    refused = ask("http://10.0.0.1/clip.mp4")
    assert refused.status_code == 422
    assert refused.json()["error"] == PREFIX + "the host 10.0.0.1 is not an allowed media domain of this server"
    inproc.wait_idle()  # the downloaded file went with the request's temp directory
    assert _request_dirs() == []


def test_without_allowed_domains_urls_are_refused(inproc):
    content = [{"type": "video_url", "video_url": "http://127.0.0.1:9/x.mp4"}, {"type": "text", "text": "Q"}]
    resp = inproc.post("/v1/chat/completions", {"model": "cogvlm2", "messages": [{"role": "user",
                                                                                  "content": content}]})
    assert resp.status_code == 422 and resp.json()["error"].startswith(PREFIX + "this server does not fetch media")


def _request_dirs() -> list[str]:
    from service.runtime import owner_dir

    owner = owner_dir()
    if owner is None:
        return []
    return [e.path for e in os.scandir(owner) if e.is_dir() and e.name.startswith("req-")]


def test_https_to_a_plain_http_port_fails_cleanly(origin, tmp_path):
    base, _, _ = origin
    fetcher = MediaFetcher(["127.0.0.1"], timeout=5)
    reason = _fails(fetcher, base.replace("http://", "https://") + "/clip.mp4", tmp_path)
    assert reason.startswith("the download failed (") and "SSL" in reason
