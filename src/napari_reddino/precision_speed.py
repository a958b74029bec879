"""Whether bfloat16 or float16 autocast saves time on a device: what "auto" precision means,
for embedding (``dtype="auto"``) and training (``train.precision=auto``) alike.

CUDA GPUs since Ampere compute bf16 in hardware. Volta and Turing (a V100, a T4, an RTX 20x0)
emulate bf16 slowly but have fp16 tensor cores: about 8x their fp32 rate on a T4 (65 against
8 TFLOPS, NVIDIA's data sheet), and the P100 computes fp16 at twice fp32; the other Pascal
cards at a 64th of it. On a CPU the instruction set does not settle it: a Zen 4 machine with
AVX512-BF16 embedded 1.6x as many cells per second in bf16 (ViT-S), while a Sapphire Rapids
virtual machine that reports AVX512-BF16 but no AMX multiplied bf16 matrices at half its fp32
speed (benchmarks/RESULTS.md). So where a CPU has bf16 instructions a ViT-sized matrix product
is timed once per process in both precisions, and bf16 is chosen only where it clearly wins.
"""

from __future__ import annotations

import functools
import time

import torch

CPU_BF16_FEATURES = ("avx512_bf16", "amx_bf16")
MIN_CPU_SPEEDUP = 1.15  # a smaller gain is not worth bf16's rounding
PROBE_REPEATS = 8


def auto_dtype(device: torch.device) -> torch.dtype:
    """bf16 where it saves time, else fp16 where that does, else fp32."""
    if bf16_saves_time(device):
        return torch.bfloat16
    return torch.float16 if fp16_saves_time(device) else torch.float32


def bf16_saves_time(device: torch.device) -> bool:
    if device.type == "cuda":  # Ampere (compute capability 8.0) and later; earlier GPUs emulate it, slowly
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        return bool(cpu_bf16_instructions()) and cpu_bf16_speedup() >= MIN_CPU_SPEEDUP
    return False


def fp16_saves_time(device: torch.device) -> bool:
    """Whether ``device`` is a CUDA GPU that computes float16 faster than float32."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    capability = torch.cuda.get_device_capability(device)
    return capability == (6, 0) or capability[0] >= 7


def cpu_bf16_instructions() -> list[str]:
    """Which of the bf16 instruction sets this CPU has (empty: bf16 is emulated through fp32)."""
    features = cpu_features()
    return [name for name in CPU_BF16_FEATURES if features.get(name, False)]


def cpu_features() -> dict[str, object]:
    """The instruction sets torch found on this CPU (empty where this torch cannot tell)."""
    query = getattr(torch.cpu, "get_capabilities", None)
    return dict(query()) if query is not None else {}


@functools.cache
def cpu_bf16_speedup() -> float:
    """fp32 time over bf16-autocast time for a ViT-S MLP product (1024 tokens, 384 -> 1536).

    The two precisions alternate and each keeps its fastest repeat, so other work on the
    machine slows neither more than the other; it takes about 0.3 s on 2 cores.
    """
    tokens, weight = torch.randn(1024, 384), torch.randn(384, 1536)
    best = {False: float("inf"), True: float("inf")}
    with torch.inference_mode():
        for repeat in range(PROBE_REPEATS + 1):
            for bf16 in best:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    start = time.perf_counter()
                    tokens @ weight
                    elapsed = time.perf_counter() - start
                if repeat:  # the first round only warms the kernels up
                    best[bf16] = min(best[bf16], elapsed)
    return best[False] / best[True]
