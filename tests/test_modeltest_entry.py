"""The modeltest entry: the model YAML drives the runner class it names, the way MindIE's modeltest
(``modeltest/model/npu_model.py``) does, and the answers are the offline runner's greedy answers."""
import dataclasses
import importlib
import json
import os

import pytest
import yaml

from atb_llm.runner.offline_runner import MultimodalInput

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
YAML_PATH = os.path.join(REPO, "tests", "modeltest", "modeltest", "config", "model", "cogvlm2_llama3_video.yaml")
# A task YAML's requested lengths (modeltest passes them to the runner's constructor).
REQUESTED_MAX_INPUT, REQUESTED_MAX_OUTPUT = 1024, 12


@dataclasses.dataclass
class ModelConfig:
    """The fields modeltest's ModelConfig reads from a model YAML, with its defaults."""

    model_name: str = ""
    model_path: str = ""
    model_type: str = ""
    data_type: str = ""
    use_chat_template: bool = False
    max_position_embedding: int = -1
    block_size: int = 128
    requested_gpu_framework: str = "Huggingface"
    trust_remote_code: bool = False
    env: dict = dataclasses.field(default_factory=dict)
    mm_model: dict | None = None


def load_config() -> ModelConfig:
    with open(YAML_PATH, encoding="utf-8") as file:
        values = yaml.safe_load(file)
    unknown = set(values) - {f.name for f in dataclasses.fields(ModelConfig)}
    assert not unknown, f"fields modeltest does not read: {unknown}"
    return ModelConfig(**values)


def test_yaml_fields():
    config = load_config()
    assert config.model_name == "cogvlm2_llama3_video"
    assert config.model_type == "pa" and config.data_type == "bf16"  # matches config.json's torch_dtype
    assert config.requested_gpu_framework in ("Huggingface", "Vllm")
    assert isinstance(config.env, dict) and all(isinstance(v, str) for v in config.env.values())
    mm = config.mm_model
    for key in ("path", "classname", "warm_up_input_texts", "warm_up_video_path", "prompt_prefix", "prompt_suffix",
                "infer_params"):
        assert key in mm, key
    assert "shm_name_save_path" in mm["infer_params"]  # npu_model reads it unconditionally


def construct_like_npu_model(config: ModelConfig, batch_size: int):
    """modeltest's NPUModel.__init__ / get_model_cls for an mm_model entry."""
    mm = config.mm_model
    input_dict = {
        "rank": int(os.getenv("RANK", "0")), "local_rank": int(os.getenv("LOCAL_RANK", "0")),
        "world_size": int(os.getenv("WORLD_SIZE", "1")), "max_prefill_tokens": -1,
        "block_size": config.block_size, "model_path": config.model_path,
        "max_position_embeddings": (config.max_position_embedding if config.max_position_embedding != -1
                                    else REQUESTED_MAX_INPUT + REQUESTED_MAX_OUTPUT),
        "max_batch_size": batch_size, "max_input_length": REQUESTED_MAX_INPUT,
        "max_output_length": REQUESTED_MAX_OUTPUT, "trust_remote_code": config.trust_remote_code,
        "input_texts": mm.get("warm_up_input_texts"), "image_path": mm.get("warm_up_image_path"),
        "video_path": mm.get("warm_up_video_path"), "audio_path": mm.get("warm_up_audio_path"),
        "shm_name_save_path": mm.get("infer_params").get("shm_name_save_path"),
    }
    module = importlib.import_module(f"examples.models.{config.model_name}.{mm['path']}")
    runner = getattr(module, mm["classname"])(**input_dict)
    runner.warm_up()
    return runner


@pytest.fixture(scope="module")
def config(chat_model_dir, video_6_frames) -> ModelConfig:
    config = load_config()
    # Point the YAML at the demo checkpoint and a real warm-up video, as a user edits model_path.
    config.model_path = chat_model_dir
    config.mm_model = dict(config.mm_model, warm_up_video_path=[video_6_frames])
    return config


@pytest.fixture(scope="module")
def runner(config):
    return construct_like_npu_model(config, batch_size=2)


def offline_answers(model_dir: str, video: str | None, questions: list[str], tmp_path) -> list[dict]:
    from examples.models.cogvlm2_llama3_video.run_pa import main

    results = tmp_path / "offline.json"
    argv = ["--model_path", model_dir, "--input_texts", *questions, "--max_output_length", str(REQUESTED_MAX_OUTPUT),
            "--max_input_length", str(REQUESTED_MAX_INPUT), "--results_save_path", str(results)]
    if video:
        argv += ["--video_path", video]
    assert main(argv) == 0
    return json.loads(results.read_text())


def test_warm_up_and_infer_give_the_offline_answers(runner, config, video_6_frames, tmp_path):
    assert runner.warm_up_done and runner.cache_manager is not None
    mm = config.mm_model
    questions = [mm["prompt_prefix"] + q + mm["prompt_suffix"] for q in ("What happens in the video?", "Who is there?")]
    # videobench's qwen2_vl-style queries: a list of content items per query.
    queries = [[{"video": video_6_frames}, {"text": question}] for question in questions]
    texts, token_nums, seconds = runner.infer(queries, **mm["infer_params"])
    expected = offline_answers(config.model_path, video_6_frames, questions, tmp_path)
    assert texts == [record["output_text"] for record in expected]
    assert [n for _, n in token_nums] == [len(record["output_token_ids"]) for record in expected]
    assert all(0 < n <= REQUESTED_MAX_OUTPUT for _, n in token_nums) and any(texts)
    assert seconds > 0
    # The same queries as a MindIE MultimodalInput-style batch, and as our own inputs.
    batch = type("Batch", (), {"input_texts": questions, "image_path": None,
                               "video_path": [video_6_frames] * 2, "audio_path": None})()
    assert runner.infer(batch, **mm["infer_params"])[0] == texts
    assert runner.infer([MultimodalInput(q, video_6_frames) for q in questions], **mm["infer_params"])[0] == texts


def test_text_only_query_and_bad_video(runner, config, tmp_path):
    mm = config.mm_model
    texts, token_nums, _ = runner.infer(["What's deep learning?", [{"video": str(tmp_path / "missing.mp4")},
                                                                   {"text": "What is it?"}]], **mm["infer_params"])
    expected = offline_answers(config.model_path, None, ["What's deep learning?"], tmp_path)
    assert texts[0] == expected[0]["output_text"]
    assert texts[1] == "" and token_nums[1] == (1, 0)  # a failed query fails alone
