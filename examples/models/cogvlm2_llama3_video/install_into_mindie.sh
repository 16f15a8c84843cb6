#!/usr/bin/env bash
# Installs cogvlm2-video-llama3-chat into an existing MindIE-LLM model tree (the directory that holds
# atb_llm/ and examples/, e.g. ${ATB_SPEED_HOME_PATH}/../atb-models or MindIE-LLM's examples/atb_models):
#
#   bash examples/models/cogvlm2_llama3_video/install_into_mindie.sh ATB_MODELS_DIR [--force]
#
# Copies
#   atb_llm/models/cogvlm2_llama3_video/                      (the plugin: get_model finds it by model_type)
#   examples/models/cogvlm2_llama3_video/                     (run_pa.sh and the model's scripts)
#   requirements/models/requirements_cogvlm2_video_llama3_chat.txt  (only if the tree has none: MindIE ships its
#       own, which pins transformers==4.42.4 and is kept byte-for-byte; the script then prints which of this
#       plugin's packages it lacks or pins outside this repository's ranges)
#   tests/modeltest/modeltest/config/model/cogvlm2_llama3_video.yaml   (only if the tree has that folder)
#   atb_llm/runner/{engine,cache,sampler,detokenizer,offline_runner}.py  (the continuous-batching runtime the
#       model's runner drives; new files beside MindIE's model_runner.py, which it uses as is)
#   atb_llm/demo/                                             (the embedded demo checkpoint and video maker)
# and refuses to overwrite an existing installation unless --force is given. Nothing else in the tree
# is touched: the framework needs no change for this model.
set -euo pipefail

usage() {
    echo "usage: $0 ATB_MODELS_DIR [--force]" >&2
    exit 2
}

target=""
force=0
for arg in "$@"; do
    case "${arg}" in
        --force) force=1 ;;
        -h|--help) usage ;;
        -*) echo "unknown option ${arg}" >&2; usage ;;
        *) [ -z "${target}" ] || usage; target="${arg}" ;;
    esac
done
[ -n "${target}" ] || usage

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source_root="$(cd "${here}/../../.." && pwd)"
model="cogvlm2_llama3_video"
requirements="requirements/models/requirements_cogvlm2_video_llama3_chat.txt"

if [ ! -d "${target}" ]; then
    echo "error: ${target} does not exist" >&2
    exit 1
fi
target="$(cd "${target}" && pwd)"
if [ ! -d "${target}/atb_llm/models" ] || [ ! -d "${target}/examples" ]; then
    echo "error: ${target} does not look like a MindIE-LLM model tree (it needs atb_llm/models/ and examples/)" >&2
    exit 1
fi
if [ "${target}" = "${source_root}" ]; then
    echo "error: ${target} is this repository itself" >&2
    exit 1
fi

sources=("atb_llm/models/${model}" "examples/models/${model}")
# MindIE's own requirements file for the model is never overwritten; ours goes in only where there is none.
keep_requirements=0
if [ -e "${target}/${requirements}" ] || [ -L "${target}/${requirements}" ]; then
    keep_requirements=1
else
    sources+=("${requirements}")
fi
for module in engine cache sampler detokenizer offline_runner; do
    sources+=("atb_llm/runner/${module}.py")
done
sources+=("atb_llm/demo")  # the embedded demo checkpoint and video (run_pa.py without --model_path)
# The regression suite's model config, when the tree has MindIE's modeltest.
modeltest_config="tests/modeltest/modeltest/config/model/${model}.yaml"
if [ -d "${target}/$(dirname "${modeltest_config}")" ]; then
    sources+=("${modeltest_config}")
fi
for path in "${sources[@]}"; do
    if [ ! -e "${source_root}/${path}" ]; then
        echo "error: ${source_root}/${path} is missing from this checkout" >&2
        exit 1
    fi
done

existing=()
for path in "${sources[@]}"; do
    if [ -e "${target}/${path}" ] || [ -L "${target}/${path}" ]; then
        existing+=("${target}/${path}")
    fi
done
if [ "${#existing[@]}" -gt 0 ] && [ "${force}" -ne 1 ]; then
    echo "error: already installed (use --force to overwrite):" >&2
    printf '  %s\n' "${existing[@]}" >&2
    exit 1
fi

for path in "${sources[@]}"; do
    destination="${target}/${path}"
    mkdir -p "$(dirname "${destination}")"
    rm -rf "${destination}"
    cp -R "${source_root}/${path}" "${destination}"
    if [ -d "${destination}" ]; then
        find "${destination}" -name "__pycache__" -type d -prune -exec rm -rf {} +
        find "${destination}" -name "*.pyc" -type f -delete
    fi
    echo "installed ${destination}"
done
chmod -R go-w "${target}/atb_llm/models/${model}" "${target}/examples/models/${model}"

requirements_step="pip install -r ${requirements}   (it leaves torch / torch_npu alone)"
if [ "${keep_requirements}" -eq 1 ]; then
    requirements_step="pip install -r ${requirements}, then what the report above says is missing"
    echo "kept MindIE's own ${target}/${requirements}"
    # Compares it with ours: which of our packages it lacks, or pins (==) at a version our ranges do not admit.
    # Standard library only; a report, never a failure.
    "${PYTHON:-python3}" - "${source_root}/${requirements}" "${target}/${requirements}" <<'PY' || \
        echo "  (could not compare it with ${source_root}/${requirements}: check it by hand)"
import re
import sys


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def release(version):
    match = re.match(r"\d+(\.\d+)*", version.strip())
    return tuple(int(part) for part in match.group().split(".")) if match else None


def admits(spec, version):
    """Whether `version` meets `spec` (comma-separated ==, !=, >=, <=, >, < clauses; ~= as >=); None: unknown."""
    have = release(version)
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        op, want = re.match(r"(==|!=|>=|<=|~=|>|<)?\s*(.*)", clause).groups()
        want = release(want)
        if have is None or want is None:
            return None
        n = max(len(have), len(want))
        a, b = have + (0,) * (n - len(have)), want + (0,) * (n - len(want))
        if not {"==": a == b, "!=": a != b, ">=": a >= b, "~=": a >= b, "<=": a <= b, ">": a > b, "<": a < b,
                None: a == b}[op]:
            return False
    return True


def parse(path):
    """{normalized name: (line, version spec)} of a requirements file; options and -r lines are skipped."""
    found = {}
    with open(path, encoding="utf-8") as file:
        for raw in file:
            line = raw.split("#", 1)[0].split(";", 1)[0].strip()
            match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^]]*\])?\s*(.*)", line)
            if match and not line.startswith("-"):
                found[norm(match.group(1))] = (line, match.group(3).strip())
    return found


ours, theirs = parse(sys.argv[1]), parse(sys.argv[2])
problems = []
for name, (line, spec) in ours.items():
    if name not in theirs:
        problems.append((line, "missing there"))
        continue
    their_line, their_spec = theirs[name]
    pin = re.fullmatch(r"(={1,3})\s*([^,<>!~=\s]+)", their_spec)
    if not pin:
        continue  # a range there, or no version: pip resolves it together with ours
    fits = admits(spec, pin.group(2))
    if pin.group(1) == "=":
        problems.append((line, f"'{their_line}' there, which pip rejects (a pin needs ==)"
                         + ("" if fits is False else "; the version itself is in our range")))
    elif fits is False:
        problems.append((line, f"pinned there as '{their_line}', outside our range"))
if problems:
    width = max(len(line) for line, _ in problems)
    print("  what this plugin needs that it lacks (our requirement: what MindIE's file has):")
    for line, why in problems:
        print(f"    {line:<{width}}  {why}")
    print("  add or fix with: pip install " + " ".join(f"'{line}'" for line, _ in problems))
else:
    print("  it has every package this plugin needs, at versions our ranges admit")
PY
fi

cat <<EOF
Next steps (in the MindIE-LLM tree ${target}):
  1. add "model_type": "${model}" and "torch_dtype": "bfloat16" to the checkpoint's config.json;
  2. ${requirements_step};
  3. bash examples/models/${model}/run_pa.sh --model_path /path/to/cogvlm2-video-llama3-chat ...
EOF
