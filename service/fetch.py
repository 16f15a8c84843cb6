"""http(s) video URLs from allowed domains (``--allowed-media-domain``), downloaded into the request's temp
directory (removed with the request).

- Only hosts on the allowlist: an entry ``example.com`` allows exactly that host, ``.example.com`` its
  subdomains too. Every redirect (at most ``MAX_REDIRECTS``) is checked again, as a new URL.
- The host's addresses are resolved once and the connection goes to the checked address (no second lookup
  that could answer differently). A host with any non-public address (private, loopback, link-local,
  reserved, multicast) is refused unless the address itself is on the allowlist or
  ``--allow-private-media-addresses`` is given.
- Size cap: a declared ``Content-Length`` over the cap is refused before reading; the body is counted as it
  arrives and refused past the cap. Time limit: the whole download, redirects included, must end within
  ``timeout`` seconds (each socket read waits at most what is left).
- No credentials in URLs, no other schemes, no other status than 200 (after redirects).
"""
from __future__ import annotations

import http.client
import ipaddress
import os
import socket
import ssl
import time
from urllib.parse import urljoin, urlsplit

from service.media import download_fail

MAX_REDIRECTS = 5
_REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK = 1 << 16


class _PinnedHTTP(http.client.HTTPConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.address = address

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _normalise(host: str) -> str:
    return host.strip().lower().rstrip(".")


class MediaFetcher:
    def __init__(self, allowed_domains: list[str], allow_private: bool = False, max_bytes: int = 512 << 20,
                 timeout: float = 30.0):
        self.allowed = [_normalise(d) for d in allowed_domains if _normalise(d)]
        self.allow_private = allow_private
        self.max_bytes = max_bytes
        self.timeout = timeout

    def host_allowed(self, host: str) -> bool:
        for entry in self.allowed:
            if entry.startswith("."):
                if host == entry[1:] or host.endswith(entry):
                    return True
            elif host == entry:
                return True
        return False

    def _address(self, host: str, port: int) -> str:
        """The address to connect to: every address of ``host`` must be public, or explicitly allowed."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as error:
            raise download_fail(f"cannot resolve the host {host} ({error.__class__.__name__})") from None
        addresses = []
        for info in infos:
            address = info[4][0]
            ip = ipaddress.ip_address(address.split("%", 1)[0])
            if not ip.is_global and not self.allow_private and _normalise(str(ip)) not in self.allowed:
                raise download_fail(f"the host {host} resolves to a non-public address ({ip}); this server does "
                                    "not fetch from private, loopback or link-local addresses unless they are "
                                    "allowed explicitly")
            addresses.append(address)
        if not addresses:
            raise download_fail(f"cannot resolve the host {host}")
        return addresses[0]

    def fetch(self, url: str, directory: str, name: str) -> str:
        """Download ``url`` into ``directory``/``name`` + its extension; returns the file's path."""
        deadline = time.monotonic() + self.timeout
        for _ in range(MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            scheme = parts.scheme.lower()
            if scheme not in ("http", "https"):
                raise download_fail(f"only http and https URLs can be fetched, got {scheme or 'none'}")
            if parts.username is not None or parts.password is not None:
                raise download_fail("credentials in media URLs are not accepted")
            host = _normalise(parts.hostname or "")
            if not host:
                raise download_fail("the media URL has no host")
            try:
                port = parts.port or (443 if scheme == "https" else 80)
            except ValueError:
                raise download_fail("the media URL has an invalid port") from None
            if not self.host_allowed(host):
                raise download_fail(f"the host {host} is not an allowed media domain of this server")
            address = self._address(host, port)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise download_fail(f"the download did not finish within {self.timeout:g} s")
            connection = (_PinnedHTTPS if scheme == "https" else _PinnedHTTP)(host, port, address, remaining)
            try:
                target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
                connection.request("GET", target, headers={"User-Agent": "cogvlm2-service",
                                                           "Accept": "video/*, */*;q=0.5"})
                response = connection.getresponse()
                if response.status in _REDIRECTS:
                    location = response.getheader("Location")
                    if not location:
                        raise download_fail(f"the server answered HTTP {response.status} without a Location")
                    url = urljoin(url, location)
                    continue
                if response.status != 200:
                    raise download_fail(f"the server answered HTTP {response.status}")
                return self._save(response, connection, directory, name, parts.path, deadline)
            except (OSError, http.client.HTTPException) as error:
                if isinstance(error, TimeoutError) or time.monotonic() >= deadline:
                    raise download_fail(f"the download did not finish within {self.timeout:g} s") from None
                raise download_fail(f"the download failed ({error.__class__.__name__})") from None
            finally:
                connection.close()
        raise download_fail(f"more than {MAX_REDIRECTS} redirects")

    def _save(self, response, connection, directory: str, name: str, url_path: str, deadline: float) -> str:
        from atb_llm.models.cogvlm2_llama3_video.data_preprocess_cogvlm2_llama3_video import (
            SUPPORTED_VIDEO_EXTENSIONS,
        )

        declared = response.getheader("Content-Length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_bytes:
            raise download_fail(f"the video has {int(declared)} bytes, more than the limit of {self.max_bytes}")
        ext = os.path.splitext(url_path)[1].lower()
        path = os.path.join(directory, name + (ext if ext in SUPPORTED_VIDEO_EXTENSIONS else ".mp4"))
        size = 0
        with open(path, "wb") as file:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise download_fail(f"the download did not finish within {self.timeout:g} s")
                if connection.sock is not None:
                    connection.sock.settimeout(remaining)
                chunk = response.read1(_CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                if size > self.max_bytes:
                    raise download_fail(f"the video is larger than the limit of {self.max_bytes} bytes")
                file.write(chunk)
        if not size:
            raise download_fail("the downloaded video is empty")
        return path
