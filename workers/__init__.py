"""What one trial runs: the benchmarks, the VLM and the two-stage DeepSpeed train loop.

Free of Ray (the Ray adapters live in tokenscale.orchestrator.driver); a single trial runs
alone with `python -m tokenscale.workers TRIAL.yaml` or under torchrun.
"""

from __future__ import annotations

import os
import platform

# The CPU kernels torch computes with, pinned so that the same trial gives the same numbers
# on any x86-64 machine with AVX2. Left alone, each library picks the kernels of the CPU it
# finds: MKL (torch's BLAS) takes other code paths on AMD than on Intel, ATen and oneDNN use
# AVX-512 where there is one, and each path sums in its own order. Measured on an AVX2 AMD
# EPYC: one demo trial's scores changed in the third decimal with these pins (their AVX2
# paths) against without (MKL's own choice), and again with the generic kernels. Set before
# torch is imported (the libraries read them once); a value already in the environment wins.
# Not on other architectures (aarch64 has neither MKL nor these ISA names).
CPU_KERNEL_ENV = {"MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def cpu_kernel_env() -> dict[str, str]:
    """The pins for this machine (none off x86-64), with any value already set kept."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    return {key: os.environ.get(key, value) for key, value in CPU_KERNEL_ENV.items()}


def pin_cpu_kernels() -> None:
    """Put the pins in this process's environment; call before importing torch."""
    os.environ.update(cpu_kernel_env())
