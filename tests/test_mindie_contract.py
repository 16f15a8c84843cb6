"""The portable host's signatures are MindIE-LLM's.

``tests/data/mindie_api_surface.json`` records, from the public MindIE-LLM tree (made by
``scripts/record_mindie_api.py``), the parameter lists of the framework names the plugin and the runtime
use. A parameter MindIE requires must be required here too (a default would let a caller that omits it
pass our tests and fail in MindIE), names and order must match (callers pass keywords), and defaults
must be the same values. The host may implement a subset of a class, but no public method MindIE lacks,
except the runtime extensions listed below, which the plugin never calls.
"""
import ast
import dataclasses
import importlib
import inspect
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SURFACE = json.loads((Path(__file__).parent / "data" / "mindie_api_surface.json").read_text(encoding="utf-8"))

# Recorded module -> the host module that mirrors it. MindIE builds its KV cache with
# examples/server/cache.py; our runtime's cache module keeps the same constructors.
HOST_MODULES = {
    "atb_llm/utils/weights.py": "atb_llm.utils.weights",
    "atb_llm/models/base/router.py": "atb_llm.models.base.router",
    "atb_llm/models/base/config.py": "atb_llm.models.base.config",
    "atb_llm/models/base/input_builder.py": "atb_llm.models.base.input_builder",
    "atb_llm/models/base/flash_causal_lm.py": "atb_llm.models.base.flash_causal_lm",
    "atb_llm/utils/shm_utils.py": "atb_llm.utils.shm_utils",
    "atb_llm/utils/file_utils.py": "atb_llm.utils.file_utils",
    "atb_llm/runner/model_runner.py": "atb_llm.runner.model_runner",
    "examples/server/cache.py": "atb_llm.runner.cache",
}

# What the plugin, the runners and the runtime use: the host must have every one of these.
REQUIRED = {
    "atb_llm/utils/weights.py": {"Weights"},
    "atb_llm/models/base/router.py": {"BaseRouter"},
    "atb_llm/models/base/config.py": {"BaseConfig"},
    "atb_llm/models/base/input_builder.py": {"InputBuilder"},
    "atb_llm/models/base/flash_causal_lm.py": {"FlashForCausalLM"},
    "atb_llm/utils/shm_utils.py": {"create_shm", "release_shared_memory", "encode_shm_name_to_int64",
                                   "encode_shape_to_int64", "decode_shm_name_from_int64",
                                   "decode_shape_from_int64", "get_data_from_shm"},
    "atb_llm/utils/file_utils.py": {"standardize_path", "check_path_permission", "check_file_safety", "safe_open",
                                    "safe_listdir", "safe_readlines"},
    "atb_llm/runner/model_runner.py": {"ModelRunner"},
    "examples/server/cache.py": {"CacheConfig", "ModelConfig", "CacheManager"},
}

# Public host methods MindIE does not have: runtime extensions for tensor-parallel leader/follower serving.
# The engine reaches them with getattr fallbacks; the plugin never calls them.
RUNTIME_EXTENSIONS = {
    ("atb_llm/runner/model_runner.py", "ModelRunner"): {"follow", "release_followers", "copy_kv_blocks"},
}

PLUGIN_DIR = ROOT / "atb_llm" / "models" / "cogvlm2_llama3_video"


def _module_constants(recorded: dict) -> dict:
    namespace = {"np": np, "torch": torch}
    for name, source in recorded["constants"].items():
        namespace[name] = eval(source, dict(namespace))
    return namespace


def _same_value(expected, actual) -> bool:
    if expected is inspect.Parameter.empty or actual is inspect.Parameter.empty:
        return expected is actual
    return type(expected) is type(actual) and expected == actual


def _signature_problems(where: str, func, recorded_params: list[dict], namespace: dict) -> list[str]:
    if isinstance(func, (staticmethod, classmethod)):
        func = func.__func__
    if isinstance(func, property):
        func = func.fget
    actual = list(inspect.signature(func).parameters.values())
    problems = []
    recorded_names = [p["name"] for p in recorded_params]
    actual_names = [("*" if p.kind is p.VAR_POSITIONAL else "**" if p.kind is p.VAR_KEYWORD else "") + p.name
                    for p in actual]
    if recorded_names != actual_names:
        return [f"{where}: parameters {actual_names}, MindIE has {recorded_names}"]
    for rec, param in zip(recorded_params, actual):
        if rec["name"].startswith("*"):
            continue
        if rec["required"]:
            if param.default is not param.empty:
                problems.append(f"{where}: {param.name} has a default ({param.default!r}); MindIE requires it")
            continue
        if param.default is param.empty:
            problems.append(f"{where}: {param.name} is required; MindIE defaults it to {rec['default']}")
            continue
        expected = eval(rec["default"], dict(namespace))
        if not _same_value(expected, param.default):
            problems.append(f"{where}: {param.name} defaults to {param.default!r}; MindIE's is {rec['default']}")
    return problems


def _contract_cases():
    for path, recorded in SURFACE["modules"].items():
        for name, entry in recorded["names"].items():
            yield pytest.param(path, name, entry, id=f"{path}:{name}")


@pytest.mark.parametrize(("path", "name", "entry"), list(_contract_cases()))
def test_host_signature_is_mindies(path, name, entry):
    host = importlib.import_module(HOST_MODULES[path])
    obj = getattr(host, name, None)
    if obj is None:
        assert name not in REQUIRED[path], f"the host has no {name} ({HOST_MODULES[path]}); our code uses it"
        pytest.skip(f"{name}: MindIE has it; the host does not implement it and nothing of ours uses it")
    namespace = _module_constants(SURFACE["modules"][path])
    if "params" in entry:
        assert not _signature_problems(name, obj, entry["params"], namespace)
        return
    problems = []
    own = vars(obj)
    for method, spec in entry["methods"].items():
        if method in own:
            problems += _signature_problems(f"{name}.{method}", own[method], spec["params"], namespace)
            kind = spec.get("kind")
            if kind and not isinstance(own[method], {"staticmethod": staticmethod, "classmethod": classmethod,
                                                     "property": property}[kind]):
                problems.append(f"{name}.{method} must be a {kind} as in MindIE")
    if "dataclass_fields" in entry:
        # The fields the class itself declares, up to the first private one: the constructor's positional
        # order (get_model passes a router's twelve arguments by position).
        assert dataclasses.is_dataclass(obj), f"{name} must be a dataclass as in MindIE"
        recorded = []
        for field in entry["dataclass_fields"]:
            if field["name"].startswith("_"):
                break
            recorded.append(field)
        host_names = list(inspect.get_annotations(obj))[:len(recorded)]
        assert host_names == [f["name"] for f in recorded], f"{name}: fields {host_names} differ from MindIE's order"
        for rec in recorded:
            expected = eval(rec["default"], dict(namespace))
            actual = vars(obj).get(rec["name"], inspect.Parameter.empty)
            if not _same_value(expected, actual):
                problems.append(f"{name}.{rec['name']} defaults to {actual!r}; MindIE's is {rec['default']}")
    extras = {m for m in own if not m.startswith("_") and callable(getattr(obj, m, None))
              and m not in entry["methods"] and m not in entry.get("attributes", ())}
    extras -= RUNTIME_EXTENSIONS.get((path, name), set())
    if extras:
        problems.append(f"{name} has public methods MindIE's lacks (a caller would break in MindIE): {sorted(extras)}")
    assert not problems, "\n".join(problems)


def test_host_module_constants_are_mindies():
    for path, recorded in SURFACE["modules"].items():
        host = importlib.import_module(HOST_MODULES[path])
        namespace = _module_constants(recorded)
        for name in recorded["constants"]:
            assert getattr(host, name, None) == namespace[name], f"{HOST_MODULES[path]}.{name}"


def _plugin_attribute_uses(variable: str) -> set[str]:
    """Attributes the plugin reads or calls on a variable of that name (``weights.get_sharded`` ...)."""
    used = set()
    for path in PLUGIN_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == variable:
                used.add(node.attr)
    return used


def test_plugin_uses_only_what_mindies_weights_has():
    weights = SURFACE["modules"]["atb_llm/utils/weights.py"]["names"]["Weights"]
    known = set(weights["methods"]) | set(weights["attributes"])
    used = _plugin_attribute_uses("weights")
    assert used, "the scan found no use of weights at all: it is not looking at the plugin"
    assert used <= known, f"the plugin uses Weights members MindIE's Weights lacks: {sorted(used - known)}"


def test_plugin_passes_what_mindie_requires():
    """Every call of a recorded Weights method in the plugin passes each parameter MindIE requires."""
    methods = SURFACE["modules"]["atb_llm/utils/weights.py"]["names"]["Weights"]["methods"]
    problems, calls = [], 0
    for path in PLUGIN_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "weights"
                    and node.func.attr in methods):
                continue
            calls += 1
            params = [p for p in methods[node.func.attr]["params"] if not p["name"].startswith("*")][1:]
            if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
                continue
            given = {p["name"] for p in params[:len(node.args)]} | {k.arg for k in node.keywords}
            missing = [p["name"] for p in params if p["required"] and p["name"] not in given]
            if missing:
                problems.append(f"{path.name}:{node.lineno} weights.{node.func.attr} misses {missing}")
    assert calls, "no Weights calls found in the plugin"
    assert not problems, "\n".join(problems)


def test_surface_record_is_from_the_pinned_tree():
    assert "MindIE-LLM" in SURFACE["source"] and len(SURFACE["modules"]) == len(HOST_MODULES)
    assert set(SURFACE["modules"]) == set(HOST_MODULES)
    tree = os.environ.get("MINDIE_ATB_TREE")
    if not tree:
        pytest.skip("MINDIE_ATB_TREE is not set: the record is not re-derived from a MindIE tree")
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "record_mindie_api.py"), tree, "--out", "/dev/stdout"],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["modules"] == SURFACE["modules"], "the MindIE tree's signatures differ from the record"
