"""Model FLOPs as torch.utils.flop_counter counts them: matrix products, convolutions and attention,
forward and backward (2 FLOPs per multiply-add). torch registers only the CUDA attention kernels;
the CPU's fused one is registered here with the same formula, so a count is the same on either device.
Causal attention is counted whole, as torch counts it (the usual convention for model FLOPs)."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten

if aten._scaled_dot_product_flash_attention_for_cpu not in flop_counter.flop_registry:
    @flop_counter.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def _cpu_attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

if aten._scaled_dot_product_flash_attention_for_cpu_backward not in flop_counter.flop_registry:
    @flop_counter.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _cpu_attention_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                                **kwargs) -> int:
        return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def count_flops(work: Callable[[], object]) -> int:
    """FLOPs of the matrix products, convolutions and attention that `work()` runs (its backward too,
    when it calls one)."""
    with FlopCounterMode(display=False) as counter:
        work()
    return counter.get_total_flops()
