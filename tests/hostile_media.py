"""A hostile media corpus, generated on the spot: real videos in every container we accept, damaged files,
decompression bombs, playlists and concat lists that point outside the allowed directory, path tricks,
FIFOs and devices. Used by ``test_hostile_media.py`` against the decoder in process and against the
running service.

Every case has an expectation: ``ok`` (answered) or ``refused`` (a clear error, nothing decoded). Files a
hostile case points *at* (the "outside" videos) live outside the allowed directory with an old access
time, so a read of them shows; a FIFO outside is the canary for an open that would block.
"""
from __future__ import annotations

import base64
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from atb_llm.demo.synthetic_video import write_synthetic_video

OLD_ATIME = 1_000_000_000  # 2001: any read under relatime moves the access time past this


@dataclass
class Case:
    name: str
    video: str  # what the client sends as video_url: a path, file:// URL or data: URL
    expect: str  # "ok" or "refused"
    kind: str  # container / damaged / bomb / playlist / path / device / inline


def _write(path: Path, data: bytes | str) -> str:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


def _single_frame_video(path: Path, width: int, height: int, codec: str, frames: int = 1) -> str:
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=1)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        if codec in ("libx265", "hevc"):
            stream.options = {"x265-params": "log-level=none"}
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), 40 * index % 255, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def build_corpus(allowed: Path, outside: Path) -> tuple[list[Case], list[Path]]:
    """Write the corpus; return its cases and the outside files that must never be read."""
    allowed.mkdir(parents=True, exist_ok=True)
    outside.mkdir(parents=True, exist_ok=True)
    size = (96, 64)
    cases: list[Case] = []

    def add(name, video, expect, kind):
        cases.append(Case(name, str(video), expect, kind))

    # Targets outside the allowed directory: a real video, and a FIFO that blocks whoever opens it.
    secret = Path(write_synthetic_video(str(outside / "secret.ts"), seconds=2, fps=5, size=size, codec="mpeg2video"))
    secret_mp4 = Path(write_synthetic_video(str(outside / "secret.mp4"), seconds=2, fps=5, size=size))
    fifo = outside / "blocking.ts"
    os.mkfifo(fifo)
    canaries = [secret, secret_mp4]

    # -- real containers and codecs we accept --------------------------------------------------------------
    for ext, codec in ((".mp4", "libx264"), (".mkv", "libx264"), (".webm", "libvpx-vp9"), (".avi", "msmpeg4v2"),
                       (".mov", "mpeg4"), (".flv", "flv1"), (".wmv", "wmv2"), (".m4v", "libx264"),
                       (".mkv", "libsvtav1"), (".mp4", "hevc")):
        name = f"real_{codec}{ext.replace('.', '_')}"
        path = write_synthetic_video(str(allowed / f"{name}{ext}"), seconds=2, fps=5, size=size, codec=codec)
        add(name, path, "ok", "container")
    real = allowed / "real_libx264_mp4.mp4"
    data = real.read_bytes()

    # -- damaged files ------------------------------------------------------------------------------------------
    add("empty", _write(allowed / "empty.mp4", b""), "refused", "damaged")
    add("one_byte", _write(allowed / "one_byte.mp4", b"\x00"), "refused", "damaged")
    add("text_named_mp4", _write(allowed / "notes.mp4", "just some notes\n" * 50), "refused", "damaged")
    add("html_named_mp4", _write(allowed / "page.mp4", "<html><body>video</body></html>"), "refused", "damaged")
    add("random_bytes", _write(allowed / "noise.mp4", np.random.default_rng(0).bytes(50_000)), "refused", "damaged")
    add("truncated_half", _write(allowed / "half.mp4", data[: len(data) // 2]), "refused", "damaged")
    add("header_only", _write(allowed / "header.mp4", data[:64]), "refused", "damaged")
    add("ftyp_then_garbage", _write(allowed / "ftyp_garbage.mp4", data[:32] + b"\xff" * 4000), "refused", "damaged")
    zeroed = bytearray(data)
    with av.open(str(real)) as container:
        for packet in container.demux(video=0):
            if packet.size and packet.pos is not None:
                zeroed[packet.pos:packet.pos + packet.size] = bytes(packet.size)
    add("zeroed_packets", _write(allowed / "zeroed.mp4", bytes(zeroed)), "refused", "damaged")
    mkv = (allowed / "real_libx264_mkv.mkv").read_bytes()
    add("mkv_truncated", _write(allowed / "cut.mkv", mkv[: len(mkv) // 3]), "refused", "damaged")
    avi = (allowed / "real_msmpeg4v2_avi.avi").read_bytes()
    add("avi_riff_only", _write(allowed / "riff.avi", avi[:12]), "refused", "damaged")
    add("ts_sync_bytes_only", _write(allowed / "sync.mp4", (b"\x47" + b"\x00" * 187) * 8), "refused", "damaged")
    with av.open(str(allowed / "audio_only.mp4"), mode="w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    add("audio_only", str(allowed / "audio_only.mp4"), "refused", "damaged")

    # -- decompression bombs: tiny files that decode to huge frames -------------------------------------------
    add("hevc_8k_frame", _single_frame_video(allowed / "bomb_8k.mp4", 7680, 4320, "hevc"), "refused", "bomb")
    add("mjpeg_8k_frame", _single_frame_video(allowed / "bomb_8k.avi", 7680, 4320, "mjpeg"), "refused", "bomb")
    add("needle_2x4000", _single_frame_video(allowed / "needle.mp4", 2, 4000, "libx264"), "refused", "bomb")
    add("needle_4000x2", _single_frame_video(allowed / "needle_wide.mkv", 4000, 2, "libx264"), "refused", "bomb")

    # -- playlists, concat lists and other formats that reference other files ---------------------------------
    hls = "#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:2.0,\n{target}\n#EXT-X-ENDLIST\n"
    add("hls_file_url", _write(allowed / "hls_abs.mp4", hls.format(target=f"file://{secret}")), "refused", "playlist")
    add("hls_relative", _write(allowed / "hls_rel.mp4", hls.format(target=os.path.relpath(secret, allowed))),
        "refused", "playlist")
    add("hls_absolute_path", _write(allowed / "hls_path.m4v", hls.format(target=str(secret))), "refused", "playlist")
    add("hls_fifo", _write(allowed / "hls_fifo.mp4", hls.format(target=str(fifo))), "refused", "playlist")
    add("hls_http", _write(allowed / "hls_http.mp4", hls.format(target="http://127.0.0.1:9/x.ts")), "refused",
        "playlist")
    add("hls_self_reference", _write(allowed / "hls_self.mp4", hls.format(target=str(allowed / "hls_self.mp4"))),
        "refused", "playlist")
    add("hls_with_bom", _write(allowed / "hls_bom.mp4", "\ufeff" + hls.format(target=str(secret))), "refused",
        "playlist")
    add("ffconcat", _write(allowed / "concat.mp4", f"ffconcat version 1.0\nfile '{secret_mp4}'\n"), "refused",
        "playlist")
    add("concat_protocol_text", _write(allowed / "concat_proto.mkv", f"concat:{secret}|{secret}"), "refused",
        "playlist")
    add("sdp", _write(allowed / "stream.mp4", "v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\n"
                                              "t=0 0\nm=video 5004 RTP/AVP 96\n"), "refused", "playlist")
    add("image2_pattern_name", _write(allowed / "img%03d.mp4", "not an image sequence"), "refused", "playlist")
    add("ffmetadata", _write(allowed / "meta.mp4", ";FFMETADATA1\ntitle=x\n"), "refused", "playlist")
    add("playlist_then_mp4", _write(allowed / "mixed.mp4", hls.format(target=str(secret)).encode() + data),
        "refused", "playlist")

    # -- path tricks ---------------------------------------------------------------------------------------------
    link = allowed / "link.mp4"
    link.symlink_to(secret_mp4)
    add("symlink_to_outside", link, "refused", "path")
    add("dotdot_traversal", f"{allowed}/../{outside.name}/secret.mp4", "refused", "path")
    add("file_url_outside", f"file://{secret_mp4}", "refused", "path")
    add("outside_absolute", secret_mp4, "refused", "path")
    add("relative_path", "real_libx264_mp4.mp4", "refused", "path")
    add("nul_in_path", f"{allowed}/real_libx264_mp4.mp4\x00.txt", "refused", "path")
    add("nul_mid_path", f"{allowed}/real\x00/../real_libx264_mp4.mp4", "refused", "path")
    add("very_long_path", f"{allowed}/{'a' * 5000}.mp4", "refused", "path")
    add("directory_named_mp4", str((allowed / "folder.mp4").resolve()), "refused", "path")
    (allowed / "folder.mp4").mkdir(exist_ok=True)
    add("missing_file", allowed / "does_not_exist.mp4", "refused", "path")
    add("unicode_name_outside", f"{allowed}/../{outside.name}/s\u00e9cret.mp4", "refused", "path")
    add("wrong_extension_real_video", _write(allowed / "real.txt", data), "refused", "path")
    add("protocol_in_path", f"concat:{secret_mp4}|{secret_mp4}", "refused", "path")

    # -- FIFOs and devices ---------------------------------------------------------------------------------------
    inside_fifo = allowed / "fifo.mp4"
    os.mkfifo(inside_fifo)
    add("fifo_in_allowed_dir", inside_fifo, "refused", "device")
    dev_link = allowed / "zero.mp4"
    dev_link.symlink_to("/dev/zero")
    add("symlink_to_dev_zero", dev_link, "refused", "device")
    add("dev_urandom", "/dev/urandom", "refused", "device")
    add("proc_environ", "/proc/self/environ", "refused", "device")

    # -- inline data URLs ----------------------------------------------------------------------------------------
    def data_url(payload: bytes, mime: str = "video/mp4") -> str:
        return f"data:{mime};base64,{base64.b64encode(payload).decode()}"

    add("inline_real_video", data_url(data), "ok", "inline")
    add("inline_hls_playlist", data_url(hls.format(target=f"file://{secret}").encode()), "refused", "inline")
    add("inline_ffconcat", data_url(f"ffconcat version 1.0\nfile '{secret_mp4}'\n".encode()), "refused", "inline")
    add("inline_hls_self", data_url(b"#EXTM3U\n#EXTINF:1,\ninline_0.mp4\n"), "refused", "inline")
    add("inline_garbage", data_url(b"\x00\x01\x02" * 1000), "refused", "inline")
    add("inline_bomb_8k", data_url((allowed / "bomb_8k.mp4").read_bytes()), "refused", "inline")
    add("inline_bad_base64", "data:video/mp4;base64,@@@not-base64@@@", "refused", "inline")
    add("inline_wrong_mime", data_url(data, "text/html"), "refused", "inline")

    for path in canaries:
        os.utime(path, (OLD_ATIME, path.stat().st_mtime))
    return cases, canaries


def atime_detects_reads(scratch: Path) -> bool:
    """Whether this filesystem moves the access time on a read of a file with an old access time."""
    probe = scratch / "atime_probe.bin"
    probe.write_bytes(b"x" * 4096)
    os.utime(probe, (OLD_ATIME, probe.stat().st_mtime))
    with open(probe, "rb") as file:
        file.read()
    return probe.stat().st_atime > OLD_ATIME


def read_canaries(canaries: list[Path]) -> list[str]:
    """Outside files whose access time moved: something opened and read them."""
    return [str(path) for path in canaries if path.stat().st_atime > OLD_ATIME]


def is_fifo(path: str) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def decode_case(video: str, allowed: str, scratch: str) -> tuple[str, str]:
    """The service's media path for one case, in process: the resolver's path rules, then the plugin's
    decoder. Returns ("ok", "") or ("refused", message); any other exception propagates (a bug)."""
    from atb_llm.models.cogvlm2_llama3_video.data_preprocess_cogvlm2_llama3_video import VideoError, load_video
    from service.errors import ApiError
    from service.media import MediaResolver

    resolver = MediaResolver([allowed], make_tmpdir=lambda: scratch)
    try:
        load_video(resolver.video_path(video), template="chat")
    except ApiError as error:
        return "refused", error.message
    except VideoError as error:
        return "refused", str(error)
    return "ok", ""


def _main() -> None:
    """``python -m tests.hostile_media CASES.json ALLOWED SCRATCH``: run every case of a built corpus in this
    process (a fresh one, so its peak RSS is the decoder's alone) and print one JSON object with each case's
    outcome and message and the peak RSS in KiB."""
    import json
    import sys

    cases_file, allowed, scratch = sys.argv[1:4]
    with open(cases_file, encoding="utf-8") as file:
        cases = [Case(**case) for case in json.load(file)]
    os.makedirs(scratch, exist_ok=True)
    results = {}
    for case in cases:
        outcome, message = decode_case(case.video, allowed, scratch)
        results[case.name] = {"expect": case.expect, "got": outcome, "message": message, "kind": case.kind}
    print(json.dumps({"results": results, "peak_rss_kb": peak_rss_kb()}))


def peak_rss_kb() -> int:
    """This process's resident high-water mark. Not ``ru_maxrss``: Linux carries that over ``exec`` from the
    parent, so a child of a big test process would report its parent's peak."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


if __name__ == "__main__":
    _main()
