"""Multimodal content items (docs/SERVICE_API.md section 6): checks, local-path rules and base64 videos.

Items become the plugin's ``{"text": ...}`` / ``{"video": local_path}``. http(s) URLs are refused unless the
server allows media domains (``--allowed-media-domain``, service/fetch.py): then they are downloaded into the
request's temp directory. A local path must resolve, without being a symlink, inside an allowed media
directory; a ``data:video/...;base64,`` URL is written into the request's own temp directory.
"""
from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Callable, Sequence

from atb_llm.models.cogvlm2_llama3_video.data_preprocess_cogvlm2_llama3_video import (
    MAX_VIDEO_BYTES,
    SUPPORTED_VIDEO_EXTENSIONS,
)
from service.errors import invalid

MEDIA_KEYS = ("image_url", "video_url", "audio_url")
ITEM_TYPES = ("text", "image_url", "video_url", "audio_url", "input_audio")
MAX_MEDIA_ITEMS = 20
MAX_TOTAL_MEDIA_BYTES = 1000 * 1024 * 1024
MAX_URL_LENGTH = 4096
DEFAULT_MEDIA_DIR = "/data/multimodal_inputs"
_DATA_URL = re.compile(r"^data:video/(mp4|x-msvideo|x-ms-wmv|mpeg);base64,", re.IGNORECASE)
_DATA_EXT = {"mp4": ".mp4", "x-msvideo": ".avi", "x-ms-wmv": ".wmv", "mpeg": ".mp4"}


def download_fail(reason: str):
    return invalid(f"[InferTokenizer::DownloadUrl] Download fail: {reason}")


def precheck_content(items: list) -> None:
    """The C++ pre-check of a content array: text is a string, media keys not null, at most 20 media."""
    media = 0
    for item in items:
        if not isinstance(item, dict):
            continue  # reported by the tokenizer step
        if "text" in item and not isinstance(item["text"], str):
            raise invalid("Request param text must be string")
        for key in MEDIA_KEYS:
            if key in item:
                if item[key] is None:
                    raise invalid(f"Request param {key} null")
                media += 1
    if media > MAX_MEDIA_ITEMS:
        raise invalid(f"The number of multimodal url should be no more than {MAX_MEDIA_ITEMS}")


def is_multimodal_list(value) -> bool:
    return isinstance(value, list)


def first_text(items: list) -> str:
    """The text of the first item whose type is "text" (vLLM's prompt echo), or ""."""
    for item in items:
        if isinstance(item, dict) and item.get("type") == "text" and isinstance(item.get("text"), str):
            return item["text"]
    return ""


def _url_of(item: dict, key: str) -> str:
    value = item.get(key)
    if isinstance(value, dict):
        value = value.get("url")
    if not isinstance(value, str) or not value:
        raise download_fail(f"{key} must be a string or an object with a string url")
    return value


class MediaResolver:
    """Turns content items into plugin items for one request."""

    def __init__(self, allowed_dirs: Sequence[str], make_tmpdir: Callable[[], str], fetcher=None):
        self.allowed_names = list(allowed_dirs)  # as configured: error texts show these, not resolved paths
        self.allowed_dirs = [os.path.realpath(d) for d in allowed_dirs]
        self.make_tmpdir = make_tmpdir
        self.fetcher = fetcher  # a service.fetch.MediaFetcher when http(s) URLs are allowed
        self.total_bytes = 0
        self.videos: list[str] = []
        self.shown: dict[str, str] = {}  # server path of each local video -> the path the client sent
        self.hidden: dict[str, str] = {}  # server-only paths (inline videos' temp files) -> a description

    def redact(self, text: str, extra: dict[str, str] | None = None) -> str:
        """``text`` (an error about this request's videos) with each server path replaced by the client's
        name for it: the path it sent, or "the inline video" for a data: URL written to a temp file.
        ``extra`` adds server-only paths (the request's temp directory) and their descriptions."""
        hidden = {**(extra or {}), **self.hidden}
        for path in sorted(hidden, key=len, reverse=True):  # longest first: a file before its directory
            if path:
                text = text.replace(repr(path), hidden[path]).replace(path, hidden[path])
        for path in sorted(self.shown, key=len, reverse=True):
            text = text.replace(path, self.shown[path])
        return text

    def resolve(self, items: list) -> list[dict]:
        out = []
        for item in items:
            if not isinstance(item, dict):
                raise invalid("The input format is invalid, it should be a List[Dict].")
            kind = item.get("type")
            if kind not in ITEM_TYPES:
                raise download_fail(f"Input type {kind} does not match the mm type.")
            if kind == "text":
                text = item.get("text")
                if not isinstance(text, str):
                    raise invalid("Request param text must be string")
                out.append({"text": text})
            elif kind == "video_url":
                out.append({"video": self.video_path(_url_of(item, "video_url"))})
            elif kind == "image_url":
                raise invalid("image_url is not supported: cogvlm2-video-llama3-chat answers about a video; send "
                              "the media as a video_url item")
            else:
                raise invalid(f"{kind} is not supported: cogvlm2-video-llama3-chat takes text and video_url items")
        return out

    def video_path(self, url: str) -> str:
        lowered = url.lower()
        if lowered.startswith(("http://", "https://")) and self.fetcher is not None:
            return self._download(url)
        if lowered.startswith(("http://", "https://")):
            raise download_fail("this server does not fetch media from the network; put the video in an allowed "
                                "media directory and send its path, or send it inline as data:video/mp4;base64,...")
        if lowered.startswith("data:"):
            return self._data_url(url)
        path = url[len("file://"):] if lowered.startswith("file://") else url
        if "\0" in path:
            raise download_fail("the local video path contains a NUL character")
        ext = os.path.splitext(path)[1].lower()
        if ext not in SUPPORTED_VIDEO_EXTENSIONS:
            raise download_fail("Input type video_url does not match the mm type. "
                                f"(supported video extensions: {', '.join(SUPPORTED_VIDEO_EXTENSIONS)})")
        return self._local(path)

    def _local(self, path: str) -> str:
        if not os.path.isabs(path):
            raise download_fail("the local video path must be absolute")
        try:
            real = self._checked_local(path)
        except (OSError, ValueError):  # a name too long, a path the OS refuses: say so, not its errno text
            raise download_fail("the local video path cannot be read") from None
        self.videos.append(real)
        self.shown.setdefault(real, path)
        return real

    def _checked_local(self, path: str) -> str:
        if os.path.islink(path):
            raise download_fail("symbolic links are not allowed as video paths")
        real = os.path.realpath(path)
        if not any(real == d or real.startswith(d.rstrip(os.sep) + os.sep) for d in self.allowed_dirs):
            raise download_fail("Your input local file path is not allowed! please ensure your multimedia files "
                                f"are placed under {', '.join(self.allowed_names) or '(no allowed directory)'}")
        if not os.path.exists(real):
            raise download_fail("the local video file does not exist")
        if not os.path.isfile(real):
            raise download_fail("the local video path is not a regular file")
        self._account(os.path.getsize(real))
        return real

    def _account(self, size: int) -> None:
        if size > MAX_VIDEO_BYTES:
            raise download_fail(f"the video has {size} bytes, more than the limit of {MAX_VIDEO_BYTES} (512 MiB)")
        self.total_bytes += size
        if self.total_bytes > MAX_TOTAL_MEDIA_BYTES:
            raise download_fail("the media of one request exceed 1000 MiB in total")

    def _download(self, url: str) -> str:
        path = self.fetcher.fetch(url, self.make_tmpdir(), f"download_{len(self.videos)}")
        self._account(os.path.getsize(path))
        self.videos.append(path)
        self.hidden[path] = "the downloaded video"
        return path

    def _data_url(self, url: str) -> str:
        match = _DATA_URL.match(url)
        if not match:
            raise download_fail("Input type video_url does not match the mm type. (inline videos must be "
                                "data:video/<mp4|x-msvideo|x-ms-wmv|mpeg>;base64,...)")
        if (len(url) - match.end()) * 3 // 4 > MAX_VIDEO_BYTES:
            raise download_fail(f"the inline video is larger than the limit of {MAX_VIDEO_BYTES} bytes")
        try:
            data = base64.b64decode(url[match.end():], validate=True)
        except (binascii.Error, ValueError) as error:
            raise download_fail(f"the inline video is not valid base64 ({error})") from None
        if not data:
            raise download_fail("the inline video is empty")
        self._account(len(data))
        path = os.path.join(self.make_tmpdir(), f"inline_{len(self.videos)}{_DATA_EXT[match.group(1).lower()]}")
        with open(path, "wb") as file:
            file.write(data)
        self.videos.append(path)
        self.hidden[path] = "the inline video"
        return path
