"""Per-request video controls (service/video.py): num_frames / fps on OpenAI chat, vLLM /generate and TGI, and
the timestamps of the frames used, in process. The clip is 5 s at 10 fps: frame k starts at k / 10 s."""
from __future__ import annotations

import os

import numpy as np
import pytest

from atb_llm.models.cogvlm2_llama3_video.config_cogvlm2_llama3_video import VISION_TOKENS_PER_FRAME
from service.video import VideoOptions, choose_frames
from tests.inprocess import error, sse_events

TS = np.arange(50) / 10  # the clip's frame start times


def test_choose_frames_by_count_and_rate():
    assert choose_frames(TS, VideoOptions(num_frames=4)) == [0, 16, 33, 49]  # 0, 1.63, 3.27, 4.9 s
    assert choose_frames(TS, VideoOptions(num_frames=1)) == [0]
    assert choose_frames(TS, VideoOptions(fps=2)) == [0, 5, 10, 15, 20, 25, 30, 35, 40, 45]
    assert choose_frames(TS, VideoOptions(fps=0.5)) == [0, 20, 40]
    assert choose_frames(TS, VideoOptions(fps=2, num_frames=3)) == [0, 20, 45]  # 10 targets thinned to 3
    assert len(choose_frames(TS, VideoOptions(fps=60))) == 24  # never more than the tower's budget
    assert choose_frames(np.arange(3) / 10, VideoOptions(num_frames=24)) == [0, 1, 2]  # a frame is used once


def _chat(clip: str, **extra) -> dict:
    content = [{"type": "video_url", "video_url": {"url": clip}}, {"type": "text", "text": "What is shown?"}]
    return {"model": "cogvlm2", "messages": [{"role": "user", "content": content}], "max_tokens": 3,
            "temperature": 0, **extra}


def test_chat_num_frames_changes_the_prompt_and_reports_timestamps(inproc, inproc_media):
    clip = os.path.join(inproc_media, "clip.mp4")
    default = inproc.post("/v1/chat/completions", _chat(clip, return_timestamps=True)).json()
    assert default["video_timestamps"] == [0.0, 1.0, 2.0, 3.0, 4.0, 4.9]  # the checkpoint's rule: 6 frames
    four = inproc.post("/v1/chat/completions", _chat(clip, mm_processor_kwargs={"num_frames": 4},
                                                     return_timestamps=True)).json()
    assert four["video_timestamps"] == [0.0, 1.6, 3.3, 4.9]
    # Two frames fewer: each was its vision slots plus its one-token time index ("4", "5").
    assert default["usage"]["prompt_tokens"] - four["usage"]["prompt_tokens"] == 2 * (VISION_TOKENS_PER_FRAME + 1)
    plain = inproc.post("/v1/chat/completions", _chat(clip)).json()
    assert "video_timestamps" not in plain and plain["usage"] == default["usage"]
    io = inproc.post("/v1/chat/completions", _chat(clip, media_io_kwargs={"video": {"fps": 0.5}},
                                                   return_timestamps=True)).json()
    assert io["video_timestamps"] == [0.0, 2.0, 4.0]
    stream = inproc.post("/v1/chat/completions", _chat(clip, stream=True, return_timestamps=True,
                                                       mm_processor_kwargs={"num_frames": 4}))
    chunks = sse_events(stream.content, b"data: ")
    assert chunks[0]["video_timestamps"] == [0.0, 1.6, 3.3, 4.9]
    assert all("video_timestamps" not in c for c in chunks[1:])


def test_a_follow_up_with_other_controls_is_not_served_the_cached_features(inproc, inproc_media):
    clip = os.path.join(inproc_media, "clip.mp4")
    first = inproc.post("/v1/chat/completions", _chat(clip, mm_processor_kwargs={"num_frames": 2})).json()
    second = inproc.post("/v1/chat/completions", _chat(clip, mm_processor_kwargs={"num_frames": 3})).json()
    assert second["usage"]["prompt_tokens"] - first["usage"]["prompt_tokens"] == VISION_TOKENS_PER_FRAME + 1
    again = inproc.post("/v1/chat/completions", _chat(clip, mm_processor_kwargs={"num_frames": 2})).json()
    assert again["choices"] == first["choices"] and again["usage"] == first["usage"]


def test_vllm_and_tgi_controls(inproc, inproc_media):
    clip = os.path.join(inproc_media, "clip.mp4")
    items = [{"type": "video_url", "video_url": clip}, {"type": "text", "text": "Describe."}]
    vllm = inproc.post("/generate", {"prompt": items, "max_tokens": 2, "mm_processor_kwargs": {"fps": 1,
                                                                                               "num_frames": 3},
                                     "return_timestamps": True}).json()
    assert vllm["video_timestamps"] == [0.0, 2.0, 4.0]
    assert list(vllm) == ["text", "video_timestamps"]
    tgi = inproc.post("/generate", {"inputs": items, "parameters": {"max_new_tokens": 2, "num_frames": 2,
                                                                    "return_timestamps": True}}).json()
    assert tgi["video_timestamps"] == [0.0, 4.9]
    chunks = sse_events(inproc.post("/generate_stream", {"inputs": items, "parameters": {
        "max_new_tokens": 2, "fps": 0.25, "return_timestamps": True}}).content, b"data: ")
    assert chunks[0]["video_timestamps"] == [0.0, 4.0]


@pytest.mark.parametrize(("path", "body", "expected"), [
    ("/v1/chat/completions", {"mm_processor_kwargs": {"num_frames": 25}},
     error("Parameter num_frames must be an integer in [1, 24], got 25")),
    ("/v1/chat/completions", {"mm_processor_kwargs": {"num_frames": 0}},
     error("Parameter num_frames must be an integer in [1, 24], got 0")),
    ("/v1/chat/completions", {"mm_processor_kwargs": {"num_frames": 2.5}},
     error("Parameter num_frames must be an integer in [1, 24], got 2.5")),
    ("/v1/chat/completions", {"media_io_kwargs": {"video": {"fps": 0}}},
     error("Parameter fps must be a number in (0, 60], got 0")),
    ("/v1/chat/completions", {"media_io_kwargs": {"video": {"fps": 61}}},
     error("Parameter fps must be a number in (0, 60], got 61")),
    ("/v1/chat/completions", {"mm_processor_kwargs": {"num_frames": 2},
                              "media_io_kwargs": {"video": {"num_frames": 3}}},
     error("num_frames is given twice with different values (2 and 3)")),
    ("/v1/chat/completions", {"mm_processor_kwargs": {"size": 3}},
     error("mm_processor_kwargs supports only num_frames and fps for this model, got ['size']")),
    ("/v1/chat/completions", {"mm_processor_kwargs": [1]}, error("mm_processor_kwargs must be an object")),
    ("/v1/chat/completions", {"media_io_kwargs": {"image": {}}},
     error("media_io_kwargs supports only video for this model, got ['image']")),
    ("/v1/chat/completions", {"return_timestamps": "yes"}, error("return_timestamps must be boolean type.")),
    ("/generate", {"prompt": "no video", "mm_processor_kwargs": {"num_frames": 2}},
     error("num_frames and fps choose the frames of a video; this request has no video")),
    ("/generate", {"inputs": "x", "parameters": {"fps": "fast"}}, error("Parameter fps must be a number in (0, 60], "
                                                                       "got 'fast'")),
])
def test_out_of_range_controls_are_clear_422(inproc, inproc_media, path, body, expected):
    if path == "/v1/chat/completions":
        body = {**_chat(os.path.join(inproc_media, "clip.mp4")), **body}
    resp = inproc.post(path, body)
    assert (resp.status_code, resp.json()) == expected
    inproc.wait_idle()
