"""Cross-entropy of student logits against teacher probabilities, one value per row, that
keeps no (rows x prototypes) float32 tensor for the backward pass.

iBOT's rows are the masked patches of a batch: about 21,000 in RedDino's ViT-S recipe (batch
280), so one float32 copy of their 131,072-prototype logits is 10.4 GiB. Written with
autograd's ``log_softmax``, the loss held three such copies at once and the recipe ran out of
memory on an 80 GB H100. Here the forward and the backward pass go through the rows in chunks
of about 1 GiB of float32 and keep only their inputs, which the step holds anyway.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

_CHUNK_ELEMENTS = 2**28  # float32 elements worked on at once: 1 GiB


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, temp: float) -> torch.Tensor:
    """``-(targets * log_softmax(logits / temp)).sum(-1)`` in float32, shape (rows,).

    Gradients reach ``logits`` only (in their dtype); ``targets`` are the teacher's, made
    without autograd."""
    return _SoftCrossEntropy.apply(logits, targets.detach(), temp)


def _row_chunks(rows: int, width: int) -> list[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(width, 1))
    return [slice(start, start + step) for start in range(0, rows, step)]


class _SoftCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, temp: float) -> torch.Tensor:
        losses = torch.empty(len(logits), dtype=torch.float32, device=logits.device)
        for part in _row_chunks(*logits.shape):
            scaled = logits[part].float() / temp  # a new tensor, also from float32 logits
            scaled.sub_(torch.logsumexp(scaled, dim=-1, keepdim=True))  # log-probabilities
            losses[part] = -(targets[part] * scaled).sum(dim=-1)
        ctx.save_for_backward(logits, targets)
        ctx.temp = temp
        return losses

    @staticmethod
    @once_differentiable  # its gradient is computed without autograd
    def backward(ctx, grad_losses: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        # d/d logits of the row's loss: (softmax(logits / temp) * sum(targets) - targets) / temp
        logits, targets = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for part in _row_chunks(*logits.shape):
            probs = torch.softmax(logits[part].float() / ctx.temp, dim=-1)
            probs.mul_(targets[part].sum(dim=-1, keepdim=True)).sub_(targets[part])
            grad[part] = probs.mul_(grad_losses[part, None] / ctx.temp)
        return grad, None, None
