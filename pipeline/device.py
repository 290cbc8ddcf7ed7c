"""Where a stage runs and in what precision: resolved once from params, outside the step."""
from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """train.device ('auto', 'cpu' or 'cuda') as a torch.device; 'auto' is CUDA when there is one.

    Raises SystemExit (a one-line message) when 'cuda' is asked for and there is none."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("train: params.yaml train.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively (AMX or AVX512-BF16).

    torch has no public API for this; its private probes are used, and a torch without them
    answers False (fp32), which is always correct, only slower where bf16 is native."""
    try:
        return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    except AttributeError:
        return False


def resolve_precision(name: str, device: torch.device) -> str:
    """train.precision with 'auto' resolved: bf16 autocast where bf16 matmuls run natively (CUDA with
    bf16, CPUs with AMX or AVX512-BF16: 1.4x the fp32 step on this CPU, same accuracy) and fp32
    elsewhere, where emulated bf16 is slower than fp32. Returns 'fp32', 'bf16' or 'fp16'.

    Raises: SystemExit (one line) for fp16 off CUDA: its gradients need the loss scaling that the loop
    does on CUDA only, and without it they underflow."""
    if name == "fp16" and device.type != "cuda":
        raise SystemExit("train.precision: fp16 needs a CUDA device (loss scaling); "
                         f"on {device.type} use bf16 or fp32")
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """Autocast for a resolved precision (fp32: disabled, bf16, fp16)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
