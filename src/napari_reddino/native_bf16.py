"""Whether a device computes in bfloat16 natively, which is where bf16 saves time.

CUDA GPUs since Ampere and CPUs with AVX512-BF16 or AMX multiply bf16 matrices in hardware.
Elsewhere torch emulates bf16 through fp32, and a bf16 model runs about twice as slowly as
the fp32 one (benchmarks/RESULTS.md), so "auto" precision means fp32 there.
"""

from __future__ import annotations

import torch

CPU_BF16_FEATURES = ("avx512_bf16", "amx_bf16")


def native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(cpu_features().get(name, False) for name in CPU_BF16_FEATURES)
    return False


def cpu_features() -> dict[str, object]:
    """The instruction sets torch found on this CPU (empty where this torch cannot tell)."""
    query = getattr(torch.cpu, "get_capabilities", None)
    return dict(query()) if query is not None else {}
