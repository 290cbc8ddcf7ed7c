"""The machine a benchmark ran on, named one way in every report: `platform.processor()` is empty
on Linux, so the CPU's model name comes from /proc/cpuinfo."""
from __future__ import annotations

import platform
from pathlib import Path

import torch


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return names[0] if names else platform.processor() or platform.machine()


def device_name() -> str:
    """The GPU where there is one, else the CPU."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_name()


# Dense bf16 tensor-core peaks, TFLOP/s. NVIDIA's data sheets give these "with sparsity"; dense is half.
# H200: https://www.nvidia.com/en-us/data-center/h200/ (BF16 Tensor Core: SXM 1,979, NVL 1,671, with sparsity)
# H100: https://www.nvidia.com/en-us/data-center/h100/ (SXM 1,979, NVL 1,671, PCIe 1,513, with sparsity)
# A100: https://www.nvidia.com/en-us/data-center/a100/ (BF16 Tensor Core 312, dense)
PEAK_BF16_TFLOPS = [("H200 NVL", 835.5), ("H200", 989.5), ("H100 NVL", 835.5), ("H100 PCIe", 756.5),
                    ("H100", 989.5), ("A100", 312.0)]


def peak_bf16_tflops(device: str) -> float | None:
    """The dense bf16 peak of a GPU named like torch.cuda.get_device_name() ('NVIDIA H200'), or None if unknown."""
    return next((peak for name, peak in PEAK_BF16_TFLOPS if name in device), None)
