"""Bad input gets a clear error for its own request; the others in the batch are answered; no KV leak."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import av
import pytest
import torch

from atb_llm.runner.engine import Request
from atb_llm.runner.offline_runner import MultimodalInput
from atb_llm.runner.sampler import SamplingParams
from tests.test_model_equivalence import make_runner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bad_videos(tmp_path_factory, video_6_frames):
    folder = tmp_path_factory.mktemp("bad")
    data = Path(video_6_frames).read_bytes()
    (folder / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (folder / "corrupt.mp4").write_bytes(data[:64] + bytes(range(256)) * 40)
    (folder / "notes.mp4").write_text("this is a text file, not a video\n")
    (folder / "clip.gif").write_bytes(data)
    with av.open(str(folder / "empty.avi"), "w") as container:  # a video stream without a single frame
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height = 64, 48
        stream.pix_fmt = "yuv420p"
        container.start_encoding()
    return {
        "missing": (str(folder / "nope.mp4"), "does not exist"),
        "truncated": (str(folder / "truncated.mp4"), "corrupt, truncated or not a video"),
        "corrupt": (str(folder / "corrupt.mp4"), "corrupt, truncated or not a video"),
        "text": (str(folder / "notes.mp4"), "corrupt, truncated or not a video"),
        "no_frames": (str(folder / "empty.avi"), "no frames"),
        "extension": (str(folder / "clip.gif"), "unsupported video extension"),
    }


@pytest.fixture(scope="module")
def runner(chat_model_dir):
    return make_runner(chat_model_dir, max_batch_size=4, block_size=8, max_input_length=600)


SAMPLING = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("case", ["missing", "truncated", "corrupt", "text", "no_frames", "extension"])
def test_bad_video_fails_only_its_request(runner, bad_videos, video_6_frames, case):
    path, pattern = bad_videos[case]
    items = [MultimodalInput("Good one?", video_6_frames), MultimodalInput("Bad one?", path),
             MultimodalInput("Text only?")]
    good, bad, text = runner.infer_multimodal(items, SAMPLING)
    assert bad.error is not None and bad.finish_reason == "error"
    assert os.path.basename(path) in bad.error, bad.error
    assert re.search(pattern, bad.error), bad.error
    assert bad.output_ids == []
    for request in (good, text):
        assert request.error is None and len(request.output_ids) == 6
    assert runner.cache_manager.block_manager.all_free


def test_prompt_longer_than_max_input_length(runner, video_24_frames, video_6_frames):
    items = [MultimodalInput("Long?", video_24_frames), MultimodalInput("Short?", video_6_frames)]
    long, short = runner.infer_multimodal(items, SAMPLING)
    assert long.finish_reason == "error"
    assert "more than the maximum input length 600" in long.error
    assert f"has {len(long.prompt_ids)} tokens" in long.error
    assert short.error is None and len(short.output_ids) == 6
    assert runner.cache_manager.block_manager.all_free


def test_failure_inside_the_engine_frees_blocks(runner, video_6_frames):
    good = runner.prepare_request(MultimodalInput("Fine?", video_6_frames), SAMPLING)
    broken = runner.prepare_request(MultimodalInput("Broken frames?", video_6_frames), SAMPLING)
    broken.pixel_values = torch.zeros(6, 4, 224, 224)  # wrong channel count reaches the vision tower
    broken.video_key, broken.vision_embeds = None, None
    engine = runner.make_engine()
    engine.generate([good, broken])
    assert broken.finish_reason == "error" and "pixel_values must be [frames, 3, H, W]" in broken.error
    assert good.error is None and len(good.output_ids) == 6
    assert engine.blocks.all_free


def test_abort_frees_blocks(runner, video_6_frames):
    engine = runner.make_engine()
    long = SamplingParams(max_new_tokens=50, temperature=0)
    first = runner.prepare_request(MultimodalInput("One?", video_6_frames), long)
    second = runner.prepare_request(MultimodalInput("Two?"), long)
    engine.add_request(first)
    engine.add_request(second)
    engine.step()
    engine.step()
    engine.abort(first.request_id)
    engine.abort(second.request_id)
    while engine.has_unfinished():
        engine.step()
    assert first.finish_reason == "abort" and second.finish_reason == "abort"
    assert engine.blocks.all_free


@pytest.mark.parametrize("field, value, message", [
    ("temperature", -1.0, "temperature"), ("top_p", 0.0, "top_p"), ("top_k", -5, "top_k"),
    ("max_new_tokens", 0, "max_new_tokens"), ("repetition_penalty", 0.0, "repetition_penalty"),
    ("presence_penalty", 3.0, "presence_penalty"),
])
def test_out_of_range_sampling_is_refused(runner, field, value, message):
    sampling = SamplingParams(**{field: value})
    request = Request(prompt_ids=[128000, 15], sampling=sampling)
    engine = runner.make_engine()
    with pytest.raises(ValueError, match=message):
        engine.add_request(request)
    assert not engine.has_unfinished()


def test_token_ids_outside_vocabulary_are_refused(runner):
    engine = runner.make_engine()
    request = Request(prompt_ids=[128000, 128256], sampling=SAMPLING)
    engine.generate([request])
    assert request.finish_reason == "error" and "outside the vocabulary" in request.error
    assert engine.blocks.all_free


def test_cli_runner_writes_results(chat_model_dir, video_6_frames, bad_videos, tmp_path):
    results = tmp_path / "results.json"
    missing = bad_videos["missing"][0]
    command = [sys.executable, "-m", "examples.models.cogvlm2_llama3_video.run_pa", "--model_path", chat_model_dir,
               "--video_path", video_6_frames, missing, "--input_texts", "What is this?", "And this?",
               "--max_output_length", "5", "--max_batch_size", "2", "--ignore_eos", "--dtype", "float32",
               "--results_save_path", str(results)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    records = json.loads(results.read_text())
    assert [r["input_text"] for r in records] == ["What is this?", "And this?"]
    good, bad = records
    assert set(good) >= {"input_text", "video_path", "output_text", "output_token_ids", "prompt_tokens",
                         "finish_reason"}
    assert good["finish_reason"] == "length" and len(good["output_token_ids"]) == 5 and good["prompt_tokens"] > 400
    assert bad["finish_reason"] == "error" and "nope.mp4" in bad["error"]
    assert "Answer[0]" in done.stderr and "Error[1]" in done.stderr and "tokens/s" in done.stdout


@pytest.mark.parametrize("args, message", [
    (["--max_batch_size", "0"], "max_batch_size must be a positive integer"),
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top_p", "2"], "top_p must be in (0, 1]"),
    (["--model_path", "/nonexistent/model"], "does not exist"),
])
def test_cli_flag_errors_are_one_line(chat_model_dir, args, message):
    command = [sys.executable, "-m", "examples.models.cogvlm2_llama3_video.run_pa", "--model_path", chat_model_dir,
               *args]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
