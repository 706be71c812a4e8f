"""The facts that decide a CPU run's last digits, and the setting that makes them agree across machines.

Two runs of the same command agree bitwise only where the library versions, the thread count and the
kernels torch dispatches to agree. torch picks its vectorised CPU kernels (softmax, layer norm, GELU,
the optimizer's arithmetic) by the CPU's instruction set: AVX-512 where the CPU has it, AVX2
otherwise, and the two round differently; oneDNN (the patch embedding's convolution) and MKL (the
matrix products) choose their code paths the same way. Pinning all three to AVX2 (``kernel_pin``)
gives every x86-64 CPU with AVX2 the same code paths (docs/results/README.md measures what the pin costs
and what it fixes).
"""

from __future__ import annotations

import functools
import os
import platform
import re
from typing import Any

# Environment variables that change which kernels run or how many threads share the work.
SETTINGS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA",
            "NPY_DISABLE_CPU_FEATURES")
# A study's ``cpu_capability`` -> the environment that holds torch's own kernels, oneDNN and MKL to it.
KERNEL_PINS = {
    "default": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_CBWR": "COMPATIBLE"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "MKL_CBWR": "AVX512"},
}
CPU_CAPABILITIES = tuple(KERNEL_PINS)


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def kernel_pin(capability: str | None) -> dict[str, str]:
    """The environment variables that pin the CPU code paths (none off x86-64 or for ``None``)."""
    if capability is None or not is_x86():
        return {}
    if capability not in KERNEL_PINS:
        raise ValueError(f"cpu capability {capability!r}; allowed: {', '.join(KERNEL_PINS)}")
    return dict(KERNEL_PINS[capability])


@functools.cache
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _blas() -> str:
    import torch

    config = torch.__config__.show()
    mkl = re.search(r"Math Kernel Library Version ([\w.\-]+)", config)
    if mkl:
        return f"MKL {mkl.group(1)}"
    info = re.search(r"BLAS_INFO=(\w+)", config)
    return info.group(1) if info else "unknown"


def environment() -> dict[str, Any]:
    """This process's versions, CPU, dispatched kernels, BLAS and thread settings."""
    import numpy
    import timm
    import torch

    try:
        from numpy._core import _multiarray_umath as umath
    except ImportError:  # numpy 1.x
        from numpy.core import _multiarray_umath as umath  # type: ignore[no-redef]
    numpy_simd = [k for k in umath.__cpu_dispatch__ if umath.__cpu_features__.get(k)]
    return {
        "python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
        "timm": timm.__version__, "machine": platform.machine(), "cpu": cpu_model(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "numpy_simd": numpy_simd,
        "blas": _blas(), "threads": torch.get_num_threads(),
        "settings": {k: os.environ[k] for k in SETTINGS if k in os.environ},
    }


def describe(env: dict[str, Any]) -> str:
    """One line for reports."""
    settings = ", ".join(f"{k}={v}" for k, v in sorted(env.get("settings", {}).items()))
    return (f"torch {env['torch']}, numpy {env['numpy']}, timm {env['timm']}, Python {env['python']}; "
            f"{env['cpu']} ({env['machine']}), torch kernels {env['torch_cpu_capability']}, {env['blas']}, "
            f"{env['threads']} thread(s)" + (f"; {settings}" if settings else ""))
