"""Video input: frame choice, decord / PyAV decoding, the frame transform and bad input.

Synthetic videos carry each frame's index in their pixels (see synthetic_video.py), so the tests
check which frames were really decoded, not only which ids were computed.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from atb_llm.demo.synthetic_video import (
    read_frame_index,
    synthetic_frame,
    write_synthetic_video,
)
from atb_llm.models.cogvlm2_llama3_video import (
    data_preprocess_cogvlm2_llama3_video as vp,
)

SIZE = (64, 48)  # (width, height): tiny so that 2700 frames encode and decode in well under 1 s
DURATIONS = (0.4, 5, 25, 90)
RATES = (10, 30)
CASES = [(seconds, fps) for seconds in DURATIONS for fps in RATES]
BACKENDS = ("decord", "pyav")

try:
    import decord  # noqa: F401

    HAVE_DECORD = True
except ImportError:
    HAVE_DECORD = False


# ------------------------------------------------------------------------------------------
# Expected frame ids, written independently of the module from docs/MODEL.md section 3
# ------------------------------------------------------------------------------------------

def expected_chat_ids(total: int, fps: int, num_frames: int = 24) -> list[int]:
    """Frame i starts at i / fps, so the frame nearest to second s is s * fps (or the last)."""
    max_second = round((total - 1) / fps) + 1
    return [min(s * fps, total - 1) for s in range(min(max_second, num_frames))]


def expected_base_ids(total: int, fps: int, num_frames: int = 24) -> list[int]:
    """Integer form of linspace(0, end - 1, n) truncated: floor(i * (end - 1) / (n - 1))."""
    end = min(total, 60 * fps)
    return [i * (end - 1) // (num_frames - 1) for i in range(num_frames)]


def expected_ids(template: str, total: int, fps: int) -> list[int]:
    return expected_base_ids(total, fps) if template == "base" else expected_chat_ids(total, fps)


def decoded_indices(clip: torch.Tensor) -> list[int]:
    """Frame indices encoded in the pixels of a uint8 [C, T, H, W] clip."""
    return [read_frame_index(frame) for frame in clip.permute(1, 2, 3, 0).numpy()]


# ------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("videos")


@pytest.fixture(scope="module")
def videos(video_dir) -> dict[tuple[float, int], str]:
    return {
        (seconds, fps): write_synthetic_video(str(video_dir / f"clip_{seconds}s_{fps}fps.mp4"),
                                              seconds, fps, SIZE)
        for seconds, fps in CASES
    }


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bad")


# ------------------------------------------------------------------------------------------
# choose_frame_ids
# ------------------------------------------------------------------------------------------

def test_expectation_helpers_hand_checked():
    # 5 s at 10 fps: timestamps 0.0 .. 4.9, max_second = round(4.9) + 1 = 6, s = 5 -> frame 49.
    assert expected_chat_ids(50, 10) == [0, 10, 20, 30, 40, 49]
    # 0.4 s: last start 0.3 s (10 fps) or 0.3667 s (30 fps) rounds to 0 -> a single frame.
    assert expected_chat_ids(4, 10) == [0]
    assert expected_chat_ids(12, 30) == [0]
    # 25 s and longer: capped at 24 frames, one per second.
    assert expected_chat_ids(250, 10) == list(range(0, 240, 10))
    # base: 90 s at 30 fps only samples the first minute (1800 frames).
    base = expected_base_ids(2700, 30)
    assert len(base) == 24 and base[0] == 0 and base[-1] == 1799 and base[1] == 78
    # The integer form equals the reference's numpy expression on all test shapes.
    for seconds, fps in CASES:
        total = round(seconds * fps)
        end = min(total, 60 * fps)
        assert expected_base_ids(total, fps) == np.linspace(0, end - 1, 24).astype(int).tolist()


@pytest.mark.parametrize(("seconds", "fps"), CASES)
@pytest.mark.parametrize("template", ["chat", "vqa", "base"])
def test_choose_frame_ids_exact_timestamps(seconds, fps, template):
    total = round(seconds * fps)
    timestamps = [i / fps for i in range(total)]
    got = vp.choose_frame_ids(timestamps, float(fps), total, template)
    assert got == expected_ids(template, total, fps)


def test_choose_frame_ids_ties_rounding_and_limits():
    # Second 1 is equally far from 0.75 and 1.25: the first frame wins.
    assert vp.choose_frame_ids([0.0, 0.25, 0.75, 1.25, 1.75], 4.0, 5, "chat") == [0, 2, 4]
    # Python's round is banker's rounding: round(2.5) == 2 -> 3 seconds; round(3.5) == 4 -> 5.
    halves = [i / 2 for i in range(6)]  # last start 2.5 s
    assert vp.choose_frame_ids(halves, 2.0, 6, "chat") == [0, 2, 4]
    halves = [i / 2 for i in range(8)]  # last start 3.5 s
    assert vp.choose_frame_ids(halves, 2.0, 8, "chat") == [0, 2, 4, 6, 7]
    # num_frames caps the count for chat and sets it for base (duplicates allowed).
    assert vp.choose_frame_ids([i / 10 for i in range(300)], 10.0, 300, "chat", 5) == [
        0, 10, 20, 30, 40]
    assert vp.choose_frame_ids([0, 0.1, 0.2, 0.3], 10.0, 4, "base") == (
        np.linspace(0, 3, 24).astype(int).tolist())
    # Unknown fps in base mode samples the whole clip instead of failing.
    assert vp.choose_frame_ids([], 0.0, 10, "base", 4) == [0, 3, 6, 9]
    with pytest.raises(vp.VideoError, match="template"):
        vp.choose_frame_ids([0.0], 1.0, 1, "story")
    with pytest.raises(vp.VideoError, match="no frames"):
        vp.choose_frame_ids([], 1.0, 0, "chat")


# ------------------------------------------------------------------------------------------
# Decoding: chosen frames, both backends
# ------------------------------------------------------------------------------------------

@pytest.mark.skipif(not HAVE_DECORD, reason="decord not installed")
def test_pyav_timestamps_match_decord(videos):
    """The PyAV index (pts order, float32 seconds) equals decord's own on every test video."""
    import decord

    for path in videos.values():
        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        ref = reader.get_frame_timestamp(range(len(reader)))[:, 0]
        pts, timestamps, fps, pts_valid = vp._pyav_index(path, vp.probe_video(path), vp.MAX_VIDEO_PIXELS)
        assert pts_valid and len(pts) == len(reader)
        np.testing.assert_array_equal(timestamps, ref)
        assert fps == reader.get_avg_fps()


@pytest.mark.parametrize(("seconds", "fps"), CASES)
@pytest.mark.parametrize("template", ["chat", "base"])
def test_load_video_frames_chooses_expected_frames(videos, seconds, fps, template):
    path = videos[(seconds, fps)]
    total = round(seconds * fps)
    want = expected_ids(template, total, fps)
    clips = {}
    for backend in BACKENDS:
        if backend == "decord" and not HAVE_DECORD:
            continue
        clip = vp.load_video_frames(path, template, backend=backend)
        assert clip.dtype == torch.uint8
        assert tuple(clip.shape) == (3, len(want), SIZE[1], SIZE[0])
        assert decoded_indices(clip) == want, backend
        clips[backend] = clip
    if len(clips) == 2:
        # Bit-identical rgb24 pixels from both decoders.
        assert torch.equal(clips["decord"], clips["pyav"])


def test_default_backend_and_vqa_template(videos):
    path = videos[(5, 10)]
    clip = vp.load_video_frames(path, "vqa")
    assert decoded_indices(clip) == [0, 10, 20, 30, 40, 49]


def test_mpeg4_avi(video_dir):
    path = write_synthetic_video(str(video_dir / "mpeg4.avi"), 3, 10, SIZE, codec="mpeg4")
    for backend in [None, "pyav"]:
        assert decoded_indices(vp.load_video_frames(path, backend=backend)) == [0, 10, 20, 29]


@pytest.mark.skipif("libsvtav1" not in av.codecs_available, reason="no AV1 encoder in PyAV")
def test_av1_falls_back_to_pyav(video_dir):
    """decord's bundled FFmpeg cannot open AV1; the default backend must still work."""
    path = write_synthetic_video(str(video_dir / "av1.mp4"), 2, 10, SIZE, codec="libsvtav1")
    assert decoded_indices(vp.load_video_frames(path)) == [0, 10, 19]
    if HAVE_DECORD:
        with pytest.raises(vp.VideoError, match="decord"):
            vp.load_video_frames(path, backend="decord")


def _write_rotated(path: str, degrees: int) -> str:
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        stream.set_display_rotation(degrees)
        for i in range(15):
            frame = av.VideoFrame.from_ndarray(synthetic_frame(i, SIZE), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.mark.skipif(not hasattr(av.video.stream.VideoStream, "set_display_rotation"),
                    reason="PyAV cannot write a display matrix")
def test_display_rotation(video_dir):
    # 180 degrees: decord rotates the frames itself; PyAV must agree.
    path = _write_rotated(str(video_dir / "rot180.mp4"), 180)
    pyav = vp.load_video_frames(path, backend="pyav")
    upright = pyav.flip(2, 3)  # undo the half turn
    assert decoded_indices(upright) == [0, 10]
    if HAVE_DECORD:
        assert torch.equal(vp.load_video_frames(path, backend="decord"), pyav)
    # 90 degrees: frames come out portrait and turned a quarter counter-clockwise.
    path = _write_rotated(str(video_dir / "rot90.mp4"), 90)
    clip = vp.load_video_frames(path)
    assert tuple(clip.shape) == (3, 2, SIZE[0], SIZE[1])
    assert decoded_indices(torch.rot90(clip, -1, dims=(2, 3))) == [0, 10]


def _count_decoded(monkeypatch) -> list:
    decoded = []
    original = vp._iter_decoded

    def counting(container, stream, needed=None):
        for frame in original(container, stream, needed):
            decoded.append(frame.pts)
            yield frame

    monkeypatch.setattr(vp, "_iter_decoded", counting)
    return decoded


def _sequential_frames(path: str, ids: list[int]) -> np.ndarray:
    """Every frame decoded in order, the chosen ones kept: what a plain decode loop gives."""
    with av.open(path) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return np.stack([frames[i] for i in ids])


def test_long_video_is_not_decoded_whole(videos, monkeypatch):
    """PyAV stops after the last chosen frame instead of decoding all 2700 frames, and the frames no other
    frame references are skipped on the way."""
    decoded = _count_decoded(monkeypatch)
    path = videos[(90, 30)]
    clip = vp.load_video_frames(path, "chat", backend="pyav")
    assert decoded_indices(clip) == expected_chat_ids(2700, 30)
    assert len(decoded) < 691  # frames 0..690 of 2700 at most, some skipped

    decoded.clear()
    clip = vp.load_video_frames(path, "base", backend="pyav")
    assert decoded_indices(clip)[-1] == 1799
    assert len(decoded) < 1800  # only the first minute


def test_plan_decode_seeks_only_when_it_skips_enough():
    keyframes = [0, 30, 60, 90]
    # One frame a second on 1 s keyframe intervals: a seek to each keyframe.
    assert vp.plan_decode([0, 30, 60, 90], keyframes, 12) == [(None, [0]), (30, [30]), (60, [60]), (90, [90])]
    # Frames close together, or a keyframe only a few frames ahead: decode on.
    assert vp.plan_decode([5, 10, 40], keyframes, 12) == [(None, [5, 10]), (30, [40])]
    assert vp.plan_decode([20, 35], keyframes, 12) == [(None, [20, 35])]
    assert vp.plan_decode([3, 3, 1], [], 12) == [(None, [1, 3])]  # no keyframes known: from the start


@pytest.mark.parametrize("container", ["mp4", "mkv", "avi"])
def test_short_keyframe_interval_seeks_with_identical_frames(video_dir, monkeypatch, container):
    """A 30 fps clip with a keyframe every second: each chosen frame is reached by a seek, and the frames are
    those of a full decode (and of decord)."""
    codec = "mpeg4" if container == "avi" else "libx264"
    path = write_synthetic_video(str(video_dir / f"gop30.{container}"), 30, 30, SIZE, codec=codec, gop=30)
    ids = expected_chat_ids(900, 30)
    decoded = _count_decoded(monkeypatch)
    clip = vp.load_video_frames(path, "chat", backend="pyav")
    assert decoded_indices(clip) == ids
    assert np.array_equal(clip.permute(1, 2, 3, 0).numpy(), _sequential_frames(path, ids))
    index = vp.scan_video(path, vp.probe_video(path))
    plan = vp.plan_decode(ids, index.keyframes)
    assert len(plan) > 10 and len(decoded) <= sum(frames[-1] - (key or 0) + 1 for key, frames in plan)
    assert len(decoded) < 691 // 2, f"decoded {len(decoded)} frames; from the start it is 691"
    if HAVE_DECORD:
        assert torch.equal(vp.load_video_frames(path, "chat", backend="decord"), clip)


def test_a_seek_that_misses_its_keyframe_decodes_from_the_start(video_dir, monkeypatch):
    """A container whose seeks land past the keyframe asked for (a broken index): the frames are still exact."""
    path = write_synthetic_video(str(video_dir / "gop30_miss.mp4"), 30, 30, SIZE, gop=30)
    original = vp._open_container

    class LandsLate:
        def __init__(self, container):
            self.container = container

        def __getattr__(self, name):
            return getattr(self.container, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.container.__exit__(*exc)

        def seek(self, offset, **kwargs):
            seeks.append(offset)
            self.container.seek(offset + 30 * 512, **kwargs)  # the next keyframe (time base 1/15360 at 30 fps)

    seeks, passes = [], []
    decode = vp._decode_chosen
    monkeypatch.setattr(vp, "_open_container", lambda file, demuxer: LandsLate(original(file, demuxer)))
    monkeypatch.setattr(vp, "_decode_chosen", lambda *args, seek: passes.append(seek) or decode(*args, seek=seek))
    clip = vp.load_video_frames(path, "chat", backend="pyav")
    assert len(seeks) == 1 and passes == [True, False]  # the first seek missed: decoded from the start
    assert np.array_equal(clip.permute(1, 2, 3, 0).numpy(), _sequential_frames(path, expected_chat_ids(900, 30)))


# ------------------------------------------------------------------------------------------
# Transform
# ------------------------------------------------------------------------------------------

MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])


def _bilinear_axis(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] half-pixel bilinear weights (align_corners=False, no antialias)."""
    weights = np.zeros((n_out, n_in))
    for dst in range(n_out):
        src = max((dst + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = min(math.floor(src), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        frac = src - lo
        weights[dst, lo] += 1.0 - frac
        weights[dst, hi] += frac
    return weights


def numpy_transform(clip: np.ndarray, size: int = 224) -> np.ndarray:
    """float64 reference: [C, T, H, W] uint8 -> [T, 3, size, size], as docs/MODEL.md describes."""
    _, _, height, width = clip.shape
    x = clip.astype(np.float64) / 255.0
    x = (x - MEAN[:, None, None, None]) / STD[:, None, None, None]
    short = min(height, width)
    new_h = size if height == short else math.floor(height / short * size)
    new_w = size if width == short else math.floor(width / short * size)
    x = _bilinear_axis(height, new_h) @ (x @ _bilinear_axis(width, new_w).T)  # rows, then cols
    top, left = round((new_h - size) / 2), round((new_w - size) / 2)
    return x[:, :, top:top + size, left:left + size].transpose(1, 0, 2, 3)


def torch_batched_transform(clip: torch.Tensor, size: int = 224) -> torch.Tensor:
    """The reference's [C, T, H, W] layout: T acts as channels of one interpolate call."""
    x = clip.float() / 255.0
    x = (x - torch.tensor(MEAN, dtype=torch.float32).view(3, 1, 1, 1)) / torch.tensor(
        STD, dtype=torch.float32).view(3, 1, 1, 1)
    _, _, h, w = x.shape
    out_hw = (size, math.floor(w / h * size)) if h <= w else (math.floor(h / w * size), size)
    x = F.interpolate(x, size=out_hw, mode="bilinear", align_corners=False)
    top, left = round((out_hw[0] - size) / 2), round((out_hw[1] - size) / 2)
    return x[:, :, top:top + size, left:left + size].permute(1, 0, 2, 3)


@pytest.mark.parametrize("hw", [(240, 320), (320, 240), (100, 100), (48, 64)])
def test_transform_matches_independent_computation(hw):
    height, width = hw
    gen = torch.Generator().manual_seed(height * 1000 + width)
    clip = torch.randint(0, 256, (3, 3, height, width), dtype=torch.uint8, generator=gen)
    out = vp.transform_frames(clip)
    assert out.dtype == torch.float32
    assert tuple(out.shape) == (3, 3, 224, 224)
    # PyTorch derives source positions in float32 (~2e-5 off at x=300); values span ~4.
    np.testing.assert_allclose(out.numpy(), numpy_transform(clip.numpy()), atol=2e-4, rtol=0)
    torch.testing.assert_close(out, torch_batched_transform(clip), atol=1e-6, rtol=0)


def per_frame_float_transform(clip: torch.Tensor, size: int = 224) -> torch.Tensor:
    """The transform as first written here (float32 normalise of each whole frame, then resize and crop):
    the optimised one must give exactly its values."""
    _, frames, height, width = clip.shape
    new_h, new_w = (math.floor(height / width * size), size) if width < height else (
        size, math.floor(width / height * size))
    top, left = round((new_h - size) / 2.0), round((new_w - size) / 2.0)
    mean = torch.tensor(MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32).view(3, 1, 1)
    out = torch.empty(frames, 3, size, size)
    for t in range(frames):
        frame = (clip[:, t].to(torch.float32) / 255.0 - mean) / std
        frame = F.interpolate(frame[None], size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
        out[t] = frame[:, top:top + size, left:left + size]
    return out


@pytest.mark.parametrize("hw", [(720, 1280), (1280, 720), (1080, 1920), (224, 224), (225, 900), (37, 5), (3, 40)])
def test_transform_is_bit_identical_to_the_whole_frame_computation(hw):
    gen = torch.Generator().manual_seed(hw[0] * 7 + hw[1])
    clip = torch.randint(0, 256, (3, 2, *hw), dtype=torch.uint8, generator=gen)
    assert torch.equal(vp.transform_frames(clip), per_frame_float_transform(clip))


def test_transform_geometry_non_square():
    """320x240 -> 298x224 -> crop columns 37..260: a marked column must land where expected."""
    clip = torch.zeros(3, 1, 240, 320, dtype=torch.uint8)
    clip[:, :, :, 160:] = 255  # right half white: the edge sits at the crop's centre
    out = vp.transform_frames(clip)
    white = ((1.0 - MEAN) / STD)[0]
    row = out[0, 0, 112].numpy()
    assert np.all(row[:100] < 0) and np.allclose(row[-100:], white, atol=1e-5)
    # Resized edge at 298 / 2 = 149 (+-1 for the blend), minus the crop offset 37 -> ~112.
    assert 110 <= int(np.argmax(row > 0)) <= 114


def test_transform_rejects_bad_clips():
    with pytest.raises(ValueError, match="uint8"):
        vp.transform_frames(torch.zeros(3, 1, 8, 8))
    with pytest.raises(ValueError, match=r"\[3, T, H, W\]"):
        vp.transform_frames(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


def test_load_video_end_to_end(videos):
    path = videos[(5, 10)]
    out = vp.load_video(path)
    assert out.dtype == torch.float32 and tuple(out.shape) == (6, 3, 224, 224)
    torch.testing.assert_close(out, vp.transform_frames(vp.load_video_frames(path)))
    assert (vp.NUM_FRAMES, vp.IMAGE_SIZE, vp.MAX_VIDEO_BYTES) == (24, 224, 512 * 1024 * 1024)
    assert ".mp4" in vp.SUPPORTED_VIDEO_EXTENSIONS and issubclass(vp.VideoError, ValueError)


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------

def _make_audio_only(path: str) -> str:
    with av.open(path, "w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32),
                                           format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, 0
        for packet in list(stream.encode(frame)) + list(stream.encode()):
            container.mux(packet)
    return path


def _make_frameless(path: str) -> str:
    """A container with a video stream header but not a single frame."""
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        container.start_encoding()
    return path


def _bad_inputs(bad_dir, videos) -> dict[str, tuple[str, str]]:
    """name -> (path, regex the message must contain)."""
    real = videos[(5, 10)]
    text = bad_dir / "notes.mp4"
    text.write_text("this is not a video\n" * 50)
    empty = bad_dir / "empty.mp4"
    empty.write_bytes(b"")
    half = bad_dir / "half.mp4"
    data = Path(real).read_bytes()
    half.write_bytes(data[: len(data) // 2])
    huge = bad_dir / "huge.mp4"
    with open(huge, "wb") as handle:  # sparse: takes no real disk space
        handle.truncate(vp.MAX_VIDEO_BYTES + 1)
    folder = bad_dir / "folder.mp4"
    folder.mkdir(exist_ok=True)
    gif = bad_dir / "real_video.gif"
    shutil.copyfile(real, gif)  # a real video, but the extension is checked before opening
    return {
        "missing": (str(bad_dir / "missing.mp4"), "does not exist"),
        "folder": (str(folder), "not a regular file"),
        "extension": (str(gif), r"unsupported video extension '\.gif'"),
        "too_large": (str(huge), "too large"),
        "empty": (str(empty), "empty"),
        "text": (str(text), "corrupt, truncated or not a video"),
        "truncated": (str(half), "corrupt, truncated or not a video"),
        "no_frames": (_make_frameless(str(bad_dir / "frameless.avi")), "no frames"),
        "no_video_stream": (_make_audio_only(str(bad_dir / "audio.mp4")), "no video stream"),
    }


@pytest.mark.parametrize("backend", [None, "pyav"])
def test_bad_input_raises_video_error(bad_dir, videos, backend):
    before = set(os.listdir(bad_dir))
    for name, (path, message) in _bad_inputs(bad_dir, videos).items():
        with pytest.raises(vp.VideoError, match=message) as info:
            vp.load_video(path, backend=backend)
        assert os.path.basename(path) in str(info.value), name
    # Nothing left behind beyond the inputs this test wrote itself.
    assert set(os.listdir(bad_dir)) - before <= {
        "notes.mp4", "empty.mp4", "half.mp4", "huge.mp4", "folder.mp4", "real_video.gif",
        "frameless.avi", "audio.mp4"}


@pytest.mark.skipif(not HAVE_DECORD, reason="decord not installed")
def test_bad_input_forced_decord(bad_dir, videos):
    for name, (path, _) in _bad_inputs(bad_dir, videos).items():
        with pytest.raises(vp.VideoError) as info:
            vp.load_video_frames(path, backend="decord")
        assert os.path.basename(path) in str(info.value), name


def test_bad_arguments(videos):
    path = videos[(5, 10)]
    with pytest.raises(vp.VideoError, match="template"):
        vp.load_video_frames(path, "story")
    with pytest.raises(ValueError, match="backend"):
        vp.load_video_frames(path, backend="opencv")
    with pytest.raises(ValueError, match="num_frames"):
        vp.load_video_frames(path, num_frames=0)


def test_corrupt_packets_in_a_valid_container(video_dir):
    """Intact index, zeroed frame data: an error, never garbage frames or a hang."""
    path = write_synthetic_video(str(video_dir / "zeroed.mp4"), 2, 10, SIZE)
    data = bytearray(Path(path).read_bytes())
    with av.open(path) as container:
        spans = [(p.pos, p.size) for p in container.demux(video=0) if p.size]
    for pos, size in spans:
        data[pos:pos + size] = bytes(size)
    Path(path).write_bytes(data)
    for backend in [None, "pyav"]:
        with pytest.raises(vp.VideoError, match="zeroed.mp4"):
            vp.load_video_frames(path, backend=backend)
