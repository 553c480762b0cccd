"""C++ extensions compiled on this machine, once, and cached.

The kernels in splitserve/*/csrc (with the shared headers in splitserve/csrc) are built with torch.utils.cpp_extension the first time a
process needs them and cached under ~/.cache/splitserve/<name>/<key>. The binary is built
with -march=native, so the key holds the CPU's model and feature flags as well as torch's
version and the compiler flags. Where a kernel cannot be built (no compiler), its caller
runs a torch-only path that gives the same result more slowly; the failure is logged once
per extension as a WARNING.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import platform
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# Headers every kernel may include (#include "float_vec.h").
INCLUDE_DIR = Path(__file__).with_name("csrc")


class NativeExtension:
    """One C++ source file, built into one importable module on first use."""

    def __init__(self, name: str, source: Path, fallback: str, extra_cflags: tuple[str, ...] = ()):
        self.name = name
        self.source = source
        self.fallback = fallback        # what the caller does without it, for the warning
        self.extra_cflags = extra_cflags
        self._lock = threading.Lock()
        self._module = None
        self._load_error: str | None = None

    def load(self):
        """The compiled module, or None (after one WARNING) if it cannot be built."""
        if self._module is not None or self._load_error is not None:
            return self._module
        with self._lock:
            if self._module is None and self._load_error is None:
                try:
                    self._module = self._build()
                except Exception as e:  # noqa: BLE001 - any build failure means: use the torch path
                    self._load_error = f"{type(e).__name__}: {e}".splitlines()[0]
                    logger.warning("%s unavailable, %s: %s", self.name, self.fallback, self._load_error)
        return self._module

    def build_dir(self) -> tuple[Path, list[str]]:
        """Where this machine's build lives, and the compiler flags it is built with."""
        capability = torch.backends.cpu.get_cpu_capability()
        # at::vec picks its implementation from CPU_CAPABILITY; match what torch itself runs.
        flags = {"AVX512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
                 "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]}.get(capability, [])
        cflags = ["-O3", "-march=native", "-fopenmp", *flags, *self.extra_cflags]
        sources = [self.source, *sorted(INCLUDE_DIR.glob("*.h"))]
        key = hashlib.sha256("|".join([torch.__version__, capability, _cpu_signature(),
                                       *(p.read_text() for p in sources), *cflags]).encode())
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        return cache / "splitserve" / self.name / key.hexdigest()[:16], cflags

    def _build(self):
        from torch.utils.cpp_extension import load

        build_dir, cflags = self.build_dir()
        build_dir.mkdir(parents=True, exist_ok=True)
        with open(build_dir / "build.flock", "w") as f:
            # One builder at a time across processes (two workers starting together). An
            # flock dies with its process; torch's own lock file does not, and one left by a
            # build that was killed would make load() wait forever: while we hold the flock,
            # a torch lock file can only be such a leftover.
            fcntl.flock(f, fcntl.LOCK_EX)
            (build_dir / "lock").unlink(missing_ok=True)
            return load(name=self.name, sources=[str(self.source)], extra_cflags=cflags,
                        extra_include_paths=[str(INCLUDE_DIR)], extra_ldflags=["-fopenmp"],
                        build_directory=str(build_dir), verbose=False)


def _cpu_signature() -> str:
    """Model name and feature flags: a -march=native binary is only valid on such a CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    wanted = [ln for ln in lines if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(wanted)))
