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
