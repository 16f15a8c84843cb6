"""Record the signatures of the MindIE-LLM names the plugin and the portable host rely on.

Reads a MindIE-LLM ``examples/atb_models`` folder with Python's ``ast`` (nothing is imported or run) and
writes, per module, the parameter lists of the chosen functions and classes (name, required or not, the
default's source text), the fields of dataclasses, the attributes a class assigns on ``self``, and the
module constants those defaults name. The
output is ``tests/data/mindie_api_surface.json``, which ``tests/test_mindie_contract.py`` compares with
the portable host's real signatures.

    python scripts/record_mindie_api.py /path/to/MindIE-LLM/examples/atb_models [--commit SHA]
"""
import argparse
import ast
import json
import os
import sys

# module path -> the top-level names whose signatures the host mirrors.
SURFACE = {
    "atb_llm/utils/weights.py": ["Weights"],
    "atb_llm/models/base/router.py": ["BaseRouter"],
    "atb_llm/models/base/config.py": ["BaseConfig"],
    "atb_llm/models/base/input_builder.py": ["InputBuilder"],
    "atb_llm/models/base/flash_causal_lm.py": ["FlashForCausalLM"],
    "atb_llm/utils/shm_utils.py": ["create_shm", "release_shared_memory", "encode_shm_name_to_int64",
                                   "encode_shape_to_int64", "decode_shm_name_from_int64", "decode_shape_from_int64",
                                   "get_data_from_shm", "process_shared_memory"],
    "atb_llm/utils/file_utils.py": ["safe_open", "standardize_path", "is_path_exists", "check_path_is_none",
                                    "check_path_is_link", "check_path_is_str", "check_path_has_special_characters",
                                    "check_path_length_lt", "check_file_size_lt", "check_owner",
                                    "check_other_write_permission", "check_path_permission", "check_file_safety",
                                    "safe_listdir", "safe_chmod", "has_owner_write_permission", "safe_readlines"],
    "atb_llm/runner/model_runner.py": ["ModelRunner"],
    "examples/server/cache.py": ["CacheConfig", "ModelConfig", "CacheManager"],
}


def _parameters(args: ast.arguments) -> list[dict]:
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    params = [_param(arg.arg, default) for arg, default in zip(positional, defaults)]
    if args.vararg:
        params.append({"name": f"*{args.vararg.arg}"})
    params += [_param(arg.arg, default) for arg, default in zip(args.kwonlyargs, args.kw_defaults)]
    if args.kwarg:
        params.append({"name": f"**{args.kwarg.arg}"})
    return params


def _param(name: str, default) -> dict:
    if default is None:
        return {"name": name, "required": True}
    return {"name": name, "required": False, "default": ast.unparse(default)}


def _is_dataclass(node: ast.ClassDef) -> bool:
    return any(ast.unparse(d).split("(")[0].endswith("dataclass") for d in node.decorator_list)


def _class_entry(node: ast.ClassDef) -> dict:
    entry = {"bases": [ast.unparse(b) for b in node.bases], "methods": {}}
    fields = []
    for item in node.body:
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
            kinds = [ast.unparse(d) for d in item.decorator_list]
            method = {"params": _parameters(item.args)}
            for kind in ("staticmethod", "classmethod", "property"):
                if kind in kinds:
                    method["kind"] = kind
            entry["methods"][item.name] = method
        elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            field = {"name": item.target.id}
            if item.value is not None:
                field["default"] = ast.unparse(item.value)
            fields.append(field)
    if _is_dataclass(node):
        entry["dataclass_fields"] = fields
    entry["attributes"] = sorted({
        target.attr for item in ast.walk(node)
        if isinstance(item, (ast.Assign, ast.AnnAssign, ast.AugAssign))
        for target in (item.targets if isinstance(item, ast.Assign) else [item.target])
        if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self"})
    return entry


def _constants(tree: ast.Module) -> dict:
    """Module-level ``NAME = <literal expression>`` assignments, by name, as source text."""
    constants = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name.isupper():
                constants[name] = ast.unparse(node.value)
    return constants


def record(tree_root: str) -> dict:
    modules = {}
    for path, names in SURFACE.items():
        with open(os.path.join(tree_root, path), encoding="utf-8") as file:
            tree = ast.parse(file.read())
        found = {}
        for node in tree.body:
            if getattr(node, "name", None) not in names:
                continue
            if isinstance(node, ast.ClassDef):
                found[node.name] = _class_entry(node)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found[node.name] = {"params": _parameters(node.args)}
        missing = sorted(set(names) - set(found))
        if missing:
            raise SystemExit(f"{path}: not found in the tree: {missing}")
        used = {d["default"] for entry in found.values()
                for params in ([entry["params"]] if "params" in entry
                               else [m["params"] for m in entry["methods"].values()])
                for d in params if "default" in d}
        constants = {k: v for k, v in _constants(tree).items() if k in used}
        modules[path] = {"names": found, "constants": constants}
    return modules


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tree", help="a MindIE-LLM examples/atb_models folder")
    parser.add_argument("--commit", default="", help="the MindIE-LLM commit the tree is at (recorded)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "data",
                                                      "mindie_api_surface.json"))
    args = parser.parse_args(argv)
    surface = {"source": f"Ascend/MindIE-LLM {args.commit}".strip() + ", examples/atb_models",
               "recorded_with": "scripts/record_mindie_api.py (Python ast: names, parameters, default source text)",
               "modules": record(args.tree)}
    with open(args.out, "w", encoding="utf-8") as file:
        json.dump(surface, file, indent=1, sort_keys=True)
        file.write("\n")
    print(f"wrote {os.path.normpath(args.out)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
