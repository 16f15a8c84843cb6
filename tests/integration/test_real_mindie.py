"""The plugin inside a real MindIE-LLM tree, driven by MindIE's own code.

Runs when ``MINDIE_ATB_TREE`` points at a MindIE-LLM ``examples/atb_models`` folder; skipped (saying why)
otherwise. The test copies that tree to a temporary folder, installs the plugin there with our
``install_into_mindie.sh``, and runs ``mindie_driver.py`` in a child process with MindIE's Python: MindIE's
``TokenizerWrapper.tokenize`` -> ``ModelRunner`` + ``load_weights`` -> its ``CacheManager`` (``torch.empty``
caches, filled with NaN before each run) -> its offline ``generate_req`` loop, for a batch of two requests
(one video, one text only), then ``prepare_prefill_token`` as MindIE's multimodal runner calls it, in fp16 and
bf16, with the Ascend operators and with the portable ones. Greedy tokens must equal the dense reference.

Environment:
- ``MINDIE_ATB_TREE``: the ``examples/atb_models`` folder (required).
- ``MINDIE_LLM_ROOT``: the folder holding MindIE's ``mindie_llm`` package (default: two levels above the tree,
  as in a MindIE-LLM checkout; in an installed MindIE, where ``mindie_llm`` is a package, it is not needed).
- ``MINDIE_PYTHON``: the interpreter with MindIE's requirements (transformers 4.42.4 ...); default: this one.
- ``MINDIE_STUB_NPU``: ``1`` to stub the Ascend-only libraries, ``0`` to use the real ones; default: stub only
  when that interpreter cannot import ``torch_npu``. The stubs are listed in ``mindie_driver.STUBBED``.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from atb_llm.demo.make_demo import make_demo_checkpoint
from atb_llm.demo.synthetic_video import write_synthetic_video
from atb_llm.models.cogvlm2_llama3_video.data_preprocess_cogvlm2_llama3_video import load_video
from tests.reference import DenseReference, chat_token_ids, reference_positions

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).resolve().parent / "mindie_driver.py"
STEPS = 12
VIDEO_QUESTION = "What is happening in this video?"
TEXT_QUESTION = "What's deep learning?"


def _tree() -> Path:
    tree = os.environ.get("MINDIE_ATB_TREE")
    if not tree:
        pytest.skip("MINDIE_ATB_TREE is not set: point it at a MindIE-LLM examples/atb_models folder to run the "
                    "plugin inside real MindIE (see README, 'Checking the plugin against your MindIE')")
    tree = Path(tree).resolve()
    if not (tree / "atb_llm" / "models").is_dir() or not (tree / "examples" / "server").is_dir():
        pytest.fail(f"MINDIE_ATB_TREE={tree} is not a MindIE-LLM examples/atb_models folder")
    return tree


def _mindie_python() -> str:
    return os.environ.get("MINDIE_PYTHON", sys.executable)


def _stub_npu(python: str) -> bool:
    choice = os.environ.get("MINDIE_STUB_NPU")
    if choice in ("0", "1"):
        return choice == "1"
    probe = subprocess.run([python, "-c", "import torch_npu"], capture_output=True)
    return probe.returncode != 0


@pytest.fixture(scope="module")
def mindie(tmp_path_factory):
    tree = _tree()
    python = _mindie_python()
    root = Path(os.environ.get("MINDIE_LLM_ROOT", tree.parent.parent)).resolve()
    if not (root / "mindie_llm").is_dir():
        installed = subprocess.run([python, "-c", "import mindie_llm"], capture_output=True, cwd=tree)
        if installed.returncode:
            pytest.fail(f"no mindie_llm package under {root} nor installed for {python}; set MINDIE_LLM_ROOT")
        root = None
    work = tmp_path_factory.mktemp("mindie")
    copy = work / "atb_models"
    shutil.copytree(tree, copy, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    install = subprocess.run(["bash", str(ROOT / "examples/models/cogvlm2_llama3_video/install_into_mindie.sh"),
                              str(copy)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    home = work / "mindie_home"  # MindIE's install and log home
    home.mkdir(mode=0o750)
    for path in (work, *work.rglob("*")):  # MindIE refuses files others can write
        if not path.is_symlink():
            path.chmod(path.stat().st_mode & ~0o002)
    return {"tree": copy, "root": root, "work": work, "home": home, "python": python, "stub": _stub_npu(python)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The demo checkpoint stored in bf16, declared as each dtype MindIE serves (it refuses fp32)."""
    made = {}
    for dtype in ("float16", "bfloat16"):
        path = make_demo_checkpoint(str(tmp_path_factory.mktemp(f"model_{dtype}")), seed=1)
        config_path = Path(path) / "config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["torch_dtype"] = dtype
        config_path.write_text(json.dumps(config, indent=1), encoding="utf-8")
        made[dtype] = path
    return made


@pytest.fixture(scope="module")
def media_video(tmp_path_factory) -> str:
    """Where MindIE's service puts a request's media: <cache>/<request>/video/<file>."""
    folder = tmp_path_factory.mktemp("cache") / "request0" / "video"
    folder.mkdir(parents=True)
    return write_synthetic_video(str(folder / "clip.mp4"), seconds=5, fps=10, size=(96, 64), seed=3)


@pytest.fixture(scope="module")
def expected(checkpoints, media_video):
    """The dense reference's greedy tokens (fp32, written from docs/MODEL.md), with its ids and vision mask."""
    model_dir = checkpoints["bfloat16"]
    reference = DenseReference(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pixels = load_video(media_video, template="chat")
    want = {}
    for name, question, frames in (("video", VIDEO_QUESTION, pixels), ("text", TEXT_QUESTION, None)):
        ids, is_vision = chat_token_ids(tokenizer, reference.config, question, [], 0 if frames is None
                                        else frames.shape[0])
        tokens, _ = reference.greedy(ids, is_vision, frames, STEPS)
        want[name] = {"ids": ids, "is_vision": is_vision, "tokens": tokens}
    return want


def run_driver(mindie, model_dir: str, video: str, ops: str, out: Path) -> dict:
    env = dict(os.environ, COGVLM2_DEVICE_OPS=ops, PYTHONDONTWRITEBYTECODE="1")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "PYTHONPATH"):
        env.pop(name, None)
    command = [mindie["python"], str(DRIVER), "--tree", str(mindie["tree"]), "--model", model_dir, "--video", video,
               "--out", str(out), "--steps", str(STEPS)]
    if mindie["root"] is not None:
        command += ["--mindie-root", str(mindie["root"])]
    if mindie["stub"]:
        # No MindIE installation: its install and ATB homes are a folder of ours (the ATB library is stubbed).
        env.update(MINDIE_LLM_HOME_PATH=str(mindie["home"]), ATB_SPEED_HOME_PATH=str(mindie["home"]))
        command.append("--stub-npu")
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text(encoding="utf-8"))


@pytest.mark.parametrize("ops", ["ascend", "portable"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_plugin_in_real_mindie_matches_the_dense_reference(mindie, checkpoints, media_video, expected, dtype, ops,
                                                            tmp_path):
    result = run_driver(mindie, checkpoints[dtype], media_video, ops, tmp_path / "result.json")
    if mindie["stub"]:
        print("stubbed (no NPU):", *result["stubbed"], sep="\n  ")
    assert result["model_class"] == "FlashCogvlm2_llama3_videoForCausalLM"
    assert result["dtype"] == f"torch.{dtype}"
    assert result["ops"] == {"ascend": "AscendOps", "portable": "PortableOps"}[ops]
    if ops == "ascend" and mindie["stub"]:
        assert result["npu_operator_calls"].get("_npu_paged_attention", 0) > 0

    for name in ("video", "text"):
        got, want = result["cases"][name], expected[name]
        codes = [i for i, token in enumerate(got["ids"]) if token < 0]
        if name == "video":  # tokenize put the frames' shm (name, shape) codes in the first two vision slots
            first_slot = want["is_vision"].index(True)
            assert codes == [first_slot, first_slot + 1]
        else:
            assert codes == []
        pad = [want["ids"][i] if i in codes else token for i, token in enumerate(got["ids"])]
        assert pad == want["ids"], f"{name}: MindIE's tokenize gave another token layout"
        assert got["positions"] == reference_positions(want["is_vision"]), f"{name}: position ids differ"
        assert got["tokens"] == want["tokens"], f"{name} ({dtype}, {ops}): greedy tokens differ from the reference"
    assert result["cases"]["prepare_prefill_token"]["tokens"] == expected["video"]["tokens"]

    # Every shared-memory segment tokenize made was released by MindIE's release_shared_memory.
    assert result["shm_names"], "tokenize wrote no shared memory for the video"
    leftover = [name for name in result["shm_names"] if os.path.exists(f"/dev/shm/{name}")]
    assert not leftover, f"shared memory left behind: {leftover}"
