"""CPUs that this machine pretends to be, to check what "auto" precision picks on each."""

from __future__ import annotations

import torch

from napari_reddino import precision_speed


def pretend_cpu(monkeypatch, cpu_features, bf16_speedup):
    """This CPU as one with ``cpu_features`` whose bf16 products time ``bf16_speedup``x fp32's
    (``None``: the product must not be timed at all)."""
    def speedup():
        assert bf16_speedup is not None, "timed bf16 on a CPU without bf16 instructions"
        return bf16_speedup

    monkeypatch.setattr(precision_speed, "cpu_features", lambda: cpu_features)
    monkeypatch.setattr(precision_speed, "cpu_bf16_speedup", speedup)


CPUS = [  # instruction sets, bf16 speedup, what "auto" picks
    ({"avx512_bf16": True}, 1.6, torch.bfloat16),  # Zen 4
    ({"amx_bf16": True}, 3.0, torch.bfloat16),
    ({"avx512_bf16": True}, 0.6, torch.float32),  # a Sapphire Rapids VM without AMX
    ({"avx512_bf16": True}, 1.1, torch.float32),  # faster, but too little to be worth bf16's rounding
    ({"avx2": True}, None, torch.float32),
]
