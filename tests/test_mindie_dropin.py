"""The plugin is a true drop-in for MindIE-LLM: it imports only what docs/DESIGN.md allows, its classes resolve
by MindIE's naming rules (docs/DESIGN.md section 2), and install_into_mindie.sh puts it where get_model
looks."""
import ast
import dataclasses
import importlib
import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_TYPE = "cogvlm2_llama3_video"
PLUGIN = f"atb_llm.models.{MODEL_TYPE}"
PLUGIN_DIR = os.path.join(REPO, "atb_llm", "models", MODEL_TYPE)
INSTALL = os.path.join(REPO, "examples", "models", MODEL_TYPE, "install_into_mindie.sh")

THIRD_PARTY = {"torch", "numpy", "transformers", "safetensors", "einops", "decord", "av"}
# Framework names the plugin may use (docs/DESIGN.md section 2): module -> importable names (None: the module itself
# may be imported, and then only these attributes used on it).
FRAMEWORK = {
    "atb_llm.models.base.router": {"BaseRouter"},
    "atb_llm.models.base.config": {"BaseConfig"},
    "atb_llm.models.base.input_builder": {"InputBuilder"},
    "atb_llm.models.base.flash_causal_lm": {"FlashForCausalLM"},
    "atb_llm.utils.weights": {"Weights"},
    "atb_llm.utils.shm_utils": {"create_shm", "encode_shm_name_to_int64", "encode_shape_to_int64",
                                "decode_shm_name_from_int64", "decode_shape_from_int64", "get_data_from_shm",
                                "release_shared_memory"},
    "atb_llm.utils.log": {"logger", "print_log"},
    "atb_llm.utils.file_utils": {"standardize_path", "check_path_permission", "safe_open"},
}
# What the plugin may touch on a Weights object: the methods docs/DESIGN.md section 2 lists, plus the
# attributes the framework's Weights also has (device, dtype, routing, get_shape).
WEIGHTS_API = {"get_tensor", "get_sharded", "get_partial_sharded", "get_multi_weights_col", "get_multi_weights_row",
               "get_replicated_weights", "process_group", "device", "dtype", "routing", "get_shape"}


def plugin_modules() -> dict[str, ast.Module]:
    modules = {}
    for name in sorted(os.listdir(PLUGIN_DIR)):
        if name.endswith(".py"):
            with open(os.path.join(PLUGIN_DIR, name), encoding="utf-8") as file:
                modules[name] = ast.parse(file.read(), filename=name)
    return modules


def _top_level_nodes(tree: ast.Module) -> set[int]:
    """ids of import nodes executed at import time (module body, including if/try blocks there)."""
    found = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.add(id(node))
            elif isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(node.orelse)
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
                visit(getattr(node, "finalbody", []))

    visit(tree.body)
    return found


def import_violations(filename: str, tree: ast.Module) -> list[str]:
    problems = []
    top_level = _top_level_nodes(tree)
    framework_aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            entries = [(alias.name, None, alias.asname) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: the plugin's own modules
                continue
            entries = [(node.module, alias.name, alias.asname) for alias in node.names]
        else:
            continue
        for module, name, asname in entries:
            root = module.split(".")[0]
            where = f"{filename}:{node.lineno}"
            if root == "torch_npu":
                if filename != "ascend_ops.py" or id(node) in top_level:
                    problems.append(f"{where}: torch_npu may only be imported inside ascend_ops' functions")
            elif module == PLUGIN or module.startswith(PLUGIN + "."):
                continue
            elif root == "atb_llm":
                full = f"{module}.{name}" if name else module
                if name and module in FRAMEWORK:
                    if name not in FRAMEWORK[module]:
                        problems.append(f"{where}: {module}.{name} is not a framework name docs/DESIGN.md allows")
                elif full in FRAMEWORK:  # a whole framework module, e.g. from atb_llm.utils import shm_utils
                    framework_aliases[asname or (name or module.split(".")[-1])] = full
                else:
                    problems.append(f"{where}: {full} is not a framework name docs/DESIGN.md allows")
            elif root not in THIRD_PARTY and root not in sys.stdlib_module_names:
                problems.append(f"{where}: {module} is not an allowed dependency")
    for node in ast.walk(tree):  # attributes used on imported framework modules
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in framework_aliases:
            module = framework_aliases[node.value.id]
            if node.attr not in FRAMEWORK[module]:
                problems.append(f"{filename}:{node.lineno}: {module}.{node.attr} is not a framework name "
                                "docs/DESIGN.md allows")
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "weights"
                and node.attr not in WEIGHTS_API):
            problems.append(f"{filename}:{node.lineno}: Weights.{node.attr} is not in the framework's Weights API")
    return problems


def test_plugin_imports_only_allowed_names():
    modules = plugin_modules()
    assert "ascend_ops.py" in modules and "router_cogvlm2_llama3_video.py" in modules
    problems = [p for name, tree in modules.items() for p in import_violations(name, tree)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(("source", "message"), [
    ("from atb_llm.utils.dist import all_reduce\n", "atb_llm.utils.dist.all_reduce"),
    ("import torch_npu\n", "torch_npu"),
    ("from atb_llm.utils import shm_utils\nshm_utils.SHM_NAME_MAX_LENGTH\n", "SHM_NAME_MAX_LENGTH"),
    ("import requests\n", "requests"),
    ("def f(weights):\n    return weights.get_tensor_col_packed_qkv('x', 1, 1)\n", "get_tensor_col_packed_qkv"),
])
def test_scan_catches_violations(source, message):
    problems = import_violations("modeling_cogvlm2_llama3_video.py", ast.parse(source))
    assert problems and message in problems[0]


def test_scan_allows_guarded_torch_npu():
    source = "def ops():\n    import torch_npu\n    return torch_npu\n"
    assert not import_violations("ascend_ops.py", ast.parse(source))
    assert import_violations("modeling_cogvlm2_llama3_video.py", ast.parse(source))


def test_names_resolve_by_mindie_rules(chat_model_dir):
    # get_model: folder name == model_type, router module built before any underscore stripping, class name
    # model_type.capitalize() + "Router" (underscores kept: not in the strip list).
    assert os.path.isdir(PLUGIN_DIR) and MODEL_TYPE != "base" and not MODEL_TYPE.startswith("_")
    cap = MODEL_TYPE.capitalize()
    assert cap == "Cogvlm2_llama3_video"
    router_module = importlib.import_module(f"{PLUGIN}.router_{MODEL_TYPE}")
    router_cls = getattr(router_module, cap + "Router")
    assert router_module.Cogvlm2llama3videoRouter is router_cls  # the spelling older releases derive
    assert dataclasses.is_dataclass(router_cls)
    from atb_llm.models.base.router import BaseRouter

    assert issubclass(router_cls, BaseRouter)
    base_fields = {f.name for f in dataclasses.fields(BaseRouter)}
    for field in dataclasses.fields(router_cls):  # extra fields need defaults (positional construction)
        if field.name not in base_fields:
            assert field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
    # BaseRouter defaults: config_<mt>.<Cap>Config and flash_causal_<mt>.Flash<Cap>ForCausalLM.
    config_cls = getattr(importlib.import_module(f"{PLUGIN}.config_{MODEL_TYPE}"), f"{cap}Config")
    model_cls = getattr(importlib.import_module(f"{PLUGIN}.flash_causal_{MODEL_TYPE}"), f"Flash{cap}ForCausalLM")
    builder_cls = getattr(importlib.import_module(f"{PLUGIN}.input_builder_{MODEL_TYPE}"), f"{cap}InputBuilder")
    # Positional construction with MindIE's 12 arguments.
    import json

    with open(os.path.join(chat_model_dir, "config.json"), encoding="utf-8") as file:
        config_dict = json.load(file)
    router = router_cls(chat_model_dir, config_dict, True, True, None, None, None, False, False, False, None, "")
    assert router.model_cls is model_cls
    assert isinstance(router.config, config_cls)
    assert isinstance(router.input_builder, builder_cls)
    from atb_llm.models import get_model

    assert type(get_model(chat_model_dir)) is router_cls


def mindie_like_tree(root: str) -> str:
    """A directory shaped like MindIE-LLM's atb_models: the framework's atb_llm (here: the portable host, without
    this model) and examples/ with another model in it."""
    tree = os.path.join(root, "atb_models")
    # MindIE's atb_llm/runner has model_runner.py (and tokenizer_wrapper.py) only: not our engine.
    shutil.copytree(os.path.join(REPO, "atb_llm"), os.path.join(tree, "atb_llm"),
                    ignore=shutil.ignore_patterns("__pycache__", MODEL_TYPE, "demo",
                                                  *[f"{m}.py" for m in RUNTIME_MODULES]))
    os.makedirs(os.path.join(tree, "examples", "models", "llava"))
    os.makedirs(os.path.join(tree, "tests", "modeltest", "modeltest", "config", "model"))
    for path in ("examples/__init__.py", "examples/models/__init__.py"):
        open(os.path.join(tree, path), "w").close()
    # MindIE's own shared runners differ from ours: the model's runner must not need them.
    for path in ("examples/run_pa.py", "examples/multimodal_runner.py"):
        with open(os.path.join(tree, path), "w") as file:
            file.write("raise ImportError('MindIE's shared runner, not this repository's')\n")
    return tree


RUNTIME_MODULES = ("engine", "cache", "sampler", "detokenizer", "offline_runner")


def run_install(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", INSTALL, *args], capture_output=True, text=True, timeout=60)


def test_install_into_mindie_tree(tmp_path, chat_model_dir, video_3_frames):
    tree = mindie_like_tree(str(tmp_path))
    assert not os.path.exists(os.path.join(tree, "atb_llm", "models", MODEL_TYPE))
    done = run_install(tree)
    assert done.returncode == 0, done.stderr
    for path in (f"atb_llm/models/{MODEL_TYPE}/router_{MODEL_TYPE}.py",
                 f"atb_llm/models/{MODEL_TYPE}/flash_causal_{MODEL_TYPE}.py",
                 f"atb_llm/models/{MODEL_TYPE}/config_{MODEL_TYPE}.py",
                 f"atb_llm/models/{MODEL_TYPE}/ascend_ops.py",
                 f"examples/models/{MODEL_TYPE}/run_pa.sh",
                 f"examples/models/{MODEL_TYPE}/run_pa.py",
                 "atb_llm/demo/make_demo.py", "atb_llm/demo/synthetic_video.py",
                 "requirements/models/requirements_cogvlm2_video_llama3_chat.txt",
                 f"tests/modeltest/modeltest/config/model/{MODEL_TYPE}.yaml"):
        assert os.path.isfile(os.path.join(tree, path)), path
    assert not any("__pycache__" in dirs for _, dirs, _ in os.walk(os.path.join(tree, "atb_llm", "models", MODEL_TYPE)))
    assert os.path.isdir(os.path.join(tree, "examples", "models", "llava"))  # the rest is untouched

    # get_model, run from inside the tree, finds the installed copy by config.json's model_type.
    probe = ("import sys; from atb_llm.models import get_model; r = get_model(sys.argv[1]); "
             "print(type(r).__name__); print(sys.modules[type(r).__module__].__file__); print(r.model_cls.__name__)")
    env = dict(os.environ, PYTHONPATH=tree)
    found = subprocess.run([sys.executable, "-c", probe, chat_model_dir], cwd=tree, env=env, capture_output=True,
                           text=True, timeout=120)
    assert found.returncode == 0, found.stderr
    name, module_file, model_cls = found.stdout.split()
    assert name == "Cogvlm2_llama3_videoRouter"
    assert module_file.startswith(os.path.realpath(tree))
    assert model_cls == "FlashCogvlm2_llama3_videoForCausalLM"

    # The model's launcher runs inside the tree, on the installed runtime and MindIE's ModelRunner.
    results = os.path.join(str(tmp_path), "results.json")
    launch_env = dict(os.environ, PYTHONPATH=tree, PYTHON=sys.executable, ASCEND_RT_VISIBLE_DEVICES="0")
    ran = subprocess.run(["bash", f"examples/models/{MODEL_TYPE}/run_pa.sh", "--model_path", chat_model_dir,
                          "--video_path", video_3_frames, "--max_output_length", "4", "--ignore_eos",
                          "--results_save_path", results], cwd=tree, env=launch_env, capture_output=True,
                         text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
    with open(results, encoding="utf-8") as file:
        record = json.load(file)[0]
    assert record["error"] is None and len(record["output_token_ids"]) == 4
    for module in RUNTIME_MODULES:
        assert os.path.isfile(os.path.join(tree, "atb_llm", "runner", f"{module}.py"))

    again = run_install(tree)
    assert again.returncode != 0 and "--force" in again.stderr
    marker = os.path.join(tree, "atb_llm", "models", MODEL_TYPE, "stale.py")
    open(marker, "w").close()
    forced = run_install(tree, "--force")
    assert forced.returncode == 0, forced.stderr
    assert not os.path.exists(marker)  # a forced install replaces the folder


# MindIE-LLM's own requirements file for this model, as it ships (its av line is malformed).
MINDIE_REQUIREMENTS = ("torch==2.9.0\ntorchvision==0.24.0\ntransformers==4.42.4\npytorchvideo==0.1.5\npillow==10.4.0\n"
                       "einops==0.8.0\nav=14.0.1\n")


def test_install_keeps_mindie_requirements_and_reports_what_to_add(tmp_path):
    tree = mindie_like_tree(str(tmp_path))
    path = os.path.join(tree, "requirements", "models", "requirements_cogvlm2_video_llama3_chat.txt")
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as file:
        file.write(MINDIE_REQUIREMENTS.encode())
    done = run_install(tree)
    assert done.returncode == 0, done.stderr
    with open(path, "rb") as file:
        assert file.read() == MINDIE_REQUIREMENTS.encode()  # kept byte-for-byte
    assert os.path.isfile(os.path.join(tree, "atb_llm", "models", MODEL_TYPE, f"router_{MODEL_TYPE}.py"))
    report = {line.split()[0]: line for line in done.stdout.splitlines() if line.startswith("    ")}
    for package in ("decord", "safetensors", "tokenizers", "numpy"):  # ours, absent from MindIE's file
        assert any(r.startswith(package) and "missing" in report[r] for r in report), done.stdout
    assert any(r.startswith("av") and "av=14.0.1" in report[r] for r in report), done.stdout
    assert not any(r.startswith(("transformers", "einops")) for r in report), done.stdout  # MindIE's pins fit
    assert "pip install" in done.stdout and "'decord==0.6.0'" in done.stdout

    # A pin outside our ranges is reported too; a --force reinstall still keeps the file.
    with open(path, "w") as file:
        file.write("transformers==4.30.0\neinops==0.8.0\nsafetensors\ntokenizers==0.19.1\nnumpy==1.26.4\n"
                   "decord==0.6.0\nav==14.0.1\n")
    again = run_install(tree, "--force")
    assert again.returncode == 0, again.stderr
    lines = [line for line in again.stdout.splitlines() if line.startswith("    ")]
    assert len(lines) == 1 and "transformers==4.30.0" in lines[0] and "outside our range" in lines[0], again.stdout
    with open(path) as file:
        assert file.read().startswith("transformers==4.30.0")


def test_install_refuses_other_directories(tmp_path):
    assert run_install(str(tmp_path)).returncode != 0  # no atb_llm/models, no examples
    assert "MindIE" in run_install(str(tmp_path)).stderr
    assert run_install(str(tmp_path / "missing")).returncode != 0
    assert run_install().returncode != 0


@pytest.mark.parity
def test_service_path_shm_codes_round_trip(chat_model_dir, video_6_frames, tmp_path):
    """router.tokenize writes the frames with the framework's shm names only; the codes read them back."""
    import numpy as np
    import torch

    from atb_llm.models import get_model
    from atb_llm.utils import shm_utils

    router = get_model(chat_model_dir)
    save_path = str(tmp_path / "shm_name.txt")
    ids = router.tokenize([{"video": video_6_frames}, {"text": "What happens?"}], shm_name_save_path=save_path)
    try:
        codes = ids[ids < 0].tolist()
        assert len(codes) == 2
        pixels = shm_utils.get_data_from_shm(codes[0], codes[1], dtype=np.float32)
        assert torch.equal(pixels, router.input_builder.load_video(video_6_frames))
    finally:
        shm_utils.release_shared_memory(save_path)


SHIPPED_RUNTIME = {f"atb_llm.runner.{m}" for m in RUNTIME_MODULES} | {"atb_llm.demo.make_demo",
                                                                    "atb_llm.demo.synthetic_video"}


def shipped_import_violations(path: str) -> list[str]:
    """Imports a shipped runtime or example module may not make inside a MindIE tree: atb_llm names other
    than the framework's (docs/DESIGN.md, plus ModelRunner), the plugin and the shipped runtime; and any
    ``examples.*`` module outside this model's folder (MindIE's shared runners differ from ours)."""
    with open(path, encoding="utf-8") as file:
        tree = ast.parse(file.read(), filename=path)
    allowed = {**FRAMEWORK, "atb_llm.runner.model_runner": {"ModelRunner"}}
    problems = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or node.level or not node.module:
            continue
        module, where = node.module, f"{os.path.relpath(path, REPO)}:{node.lineno}"
        if module.startswith("examples.") and not module.startswith(f"examples.models.{MODEL_TYPE}"):
            problems.append(f"{where}: {module} is not shipped (MindIE has its own)")
        elif module.startswith("atb_llm.") and not (module.startswith(PLUGIN) or module in SHIPPED_RUNTIME):
            names = {alias.name for alias in node.names}
            if module not in allowed or not names <= allowed[module]:
                problems.append(f"{where}: {module}.{sorted(names)} does not exist in MindIE")
    return problems


def test_shipped_runtime_and_runner_use_only_names_mindie_has(tmp_path):
    paths = [os.path.join(REPO, "atb_llm", "runner", f"{m}.py") for m in RUNTIME_MODULES]
    example_dir = os.path.join(REPO, "examples", "models", MODEL_TYPE)
    paths += [os.path.join(example_dir, n) for n in sorted(os.listdir(example_dir)) if n.endswith(".py")]
    paths += [os.path.join(REPO, "atb_llm", "demo", n) for n in ("make_demo.py", "synthetic_video.py")]
    problems = [p for path in paths for p in shipped_import_violations(path)]
    assert not problems, "\n".join(problems)
    bad = tmp_path / "bad.py"  # the checker catches a host-only helper and MindIE's differing runners
    bad.write_text("from atb_llm.utils.dist import destroy_distributed\nfrom examples.run_pa import PARunner\n"
                   "from atb_llm.runner.model_runner import ModelRunner\n")
    found = shipped_import_violations(str(bad))
    assert len(found) == 2 and "atb_llm.utils.dist" in found[0] and "examples.run_pa" in found[1]
