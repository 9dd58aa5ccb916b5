"""What the benchmarks ran on: CPU, cores, torch and its threads, numpy/BLAS, GPU, load."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cores() -> str:
    logical = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical
    return f"{usable} usable of {logical} logical" if usable != logical else f"{logical} logical"


def load_average() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "unknown"
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min)"


def torch_blas() -> str:
    import torch

    config = torch.__config__.show()
    blas = next((part.split("=", 1)[1] for part in config.replace(",", " ").split() if part.startswith("BLAS_INFO=")),
                "unknown")
    capability = next((line.split(":", 1)[1].strip() for line in config.splitlines()
                       if "CPU capability usage" in line), "unknown")
    return f"BLAS {blas}, CPU kernels {capability}"


def numpy_blas() -> str:
    import numpy as np

    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:  # older numpy without mode="dicts"
        return "unknown"


def gpu() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return None
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return f"{', '.join(names)} (CUDA {torch.version.cuda})"


def describe() -> list[str]:
    """One markdown bullet per fact (torch threads as they are now, i.e. torch's default)."""
    import numpy as np
    import torch

    lines = [
        f"CPU: {cpu_model()}, {cores()} cores",
        f"torch {torch.__version__}: {torch.get_num_threads()} intra-op threads by default, {torch_blas()}",
        f"numpy {np.__version__}: {numpy_blas()}",
        f"GPU: {gpu() or 'none'}",
        f"Python {platform.python_version()} on {platform.system()} {platform.release()}",
        f"load average at start: {load_average()}",
    ]
    return lines


if __name__ == "__main__":
    print("\n".join(f"- {line}" for line in describe()))
