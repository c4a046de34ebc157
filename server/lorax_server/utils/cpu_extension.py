"""The CPU kernels' C++ extensions: built with `torch.utils.cpp_extension` on first use (or ahead of
time with `python -m lorax_server.utils.cpu_extension --build`, which `make install` runs), loaded
once per process, and registered with torch's dispatcher under their own namespace.

Every kernel has a torch reference path beside it; that path runs instead anywhere but on CPU
tensors, when a build fails (with a warning), or when `LORAX_CPU_KERNELS=0` asks for it.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


def kernels_enabled() -> bool:
    """False when `LORAX_CPU_KERNELS=0` asks for the torch reference paths."""
    return os.environ.get("LORAX_CPU_KERNELS", "1") != "0"


class CpuExtension:
    """C++ sources (one, or several that each register some of its ops) compiled into one library that
    registers `torch.ops.<namespace>`."""

    def __init__(self, name: str, sources: Path | list[Path], namespace: str, description: str) -> None:
        self.name = name
        self.sources = sources if isinstance(sources, list) else [sources]
        self.namespace = namespace
        self.description = description  # for the warning when the build fails
        self._ops: Any = None
        self._attempted = False
        self._lock = threading.Lock()

    def build_directory(self) -> Path:
        """`$TORCH_EXTENSIONS_DIR` (default ~/.cache/torch_extensions), one folder per torch and Python
        version so that environments never load each other's binaries."""
        from torch.utils.cpp_extension import get_default_build_root

        root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
        py = f"py{sys.version_info.major}{sys.version_info.minor}"
        return root / f"{self.name}-{py}-torch{torch.__version__.replace('+', '_')}"

    def build(self, verbose: bool = False) -> str:
        """Compiles (or reuses a cached build of) the extension and loads it into the process; returns
        the library's path and raises when the compiler fails. cpp_extension holds a file lock over
        the build, so processes starting together build once and the others wait."""
        from torch.utils.cpp_extension import load

        directory = self.build_directory()
        directory.mkdir(parents=True, exist_ok=True)
        # SIMD code carries target attributes and is picked at run time: -march=native would tie the
        # binary to the build machine. at::parallel_for is inline OpenMP code in torch's headers:
        # without -fopenmp it silently runs on one thread (the loader then shares torch's libgomp).
        openmp = ["-fopenmp"] if torch.backends.openmp.is_available() else []
        return load(
            name=self.name,
            sources=[str(source) for source in self.sources],
            extra_cflags=["-O3", "-fno-math-errno", *openmp],
            extra_ldflags=openmp,
            build_directory=str(directory),
            is_python_module=False,
            verbose=verbose,
        )

    def ops(self) -> Any:
        """`torch.ops.<namespace>`, loaded once per process; None when disabled or the build failed."""
        if self._attempted:
            return self._ops
        with self._lock:  # threads arriving during the first build wait for it
            if not self._attempted:
                if kernels_enabled():
                    try:
                        self.build()
                        self._ops = getattr(torch.ops, self.namespace)
                    except Exception as exc:  # any compiler or loader failure means: use the torch path
                        logger.warning("%s unavailable, using the torch reference path: %s", self.description, exc)
                self._attempted = True
        return self._ops

    def reset(self) -> None:
        """Forget the load decision (tests switch `LORAX_CPU_KERNELS` and look again)."""
        with self._lock:
            self._ops, self._attempted = None, False


# The modules that own an extension, each as `EXTENSION` (imported only by the build command).
_OWNERS = (
    "lorax_server.layers.quant.lut",
    "lorax_server.layers.paged_attention",
    "lorax_server.layers.fused_cpu",
    "lorax_server.adapters.lora_cpu",
)


def main(argv: list[str]) -> int:
    if argv != ["--build"]:
        print("usage: python -m lorax_server.utils.cpu_extension --build", file=sys.stderr)
        return 2
    for owner in _OWNERS:
        extension: CpuExtension = importlib.import_module(owner).EXTENSION
        start = time.perf_counter()
        try:
            path = extension.build()
        except Exception as exc:
            print(f"{extension.name}: build failed: {exc}", file=sys.stderr)
            return 1
        print(f"built {path} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
