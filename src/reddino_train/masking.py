"""iBOT block masks: which patches of each global crop the student sees as mask tokens.

As in DINOv2, a mask is built from random rectangles (aspect ratio in [0.3, 1/0.3]) until the
target number of patches is covered, a fixed fraction of the crops in a batch is masked, and
their mask ratios are spread evenly over the configured range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class BlockMaskGenerator:
    """Masks of ``grid`` = (rows, cols) patches built from random rectangles.

    min_block/max_block bound the area drawn for each rectangle; the defaults are DINOv2's
    (4 patches, and half the patches when max_block is None). The last rectangle is trimmed
    when it would overshoot, so a mask always covers exactly the number of patches asked for.
    """

    grid: tuple[int, int]
    min_block: int = 4
    max_block: int | None = None
    min_aspect: float = 0.3

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def __call__(self, n_masked: int, rng: np.random.Generator) -> np.ndarray:
        rows, cols = self.grid
        if not 0 <= n_masked <= self.n_patches:
            raise ValueError(f"cannot mask {n_masked} of {self.n_patches} patches")
        max_block = self.max_block or max(self.n_patches // 2, 1)
        log_aspect = (math.log(self.min_aspect), math.log(1 / self.min_aspect))
        mask = np.zeros(self.grid, dtype=bool)
        count = 0
        while count < n_masked:
            budget = min(n_masked - count, max_block)
            area = rng.uniform(min(self.min_block, budget), budget)
            aspect = math.exp(rng.uniform(*log_aspect))
            height = min(max(round(math.sqrt(area * aspect)), 1), rows)
            width = min(max(round(math.sqrt(area / aspect)), 1), cols)
            top = rng.integers(0, rows - height + 1)
            left = rng.integers(0, cols - width + 1)
            block = mask[top : top + height, left : left + width]  # a view into mask
            free_rows, free_cols = np.nonzero(~block)
            take = min(len(free_rows), n_masked - count)
            block[free_rows[:take], free_cols[:take]] = True
            count += take
        return mask


def sample_masks(
    generator: BlockMaskGenerator,
    n_crops: int,
    ratio_min_max: tuple[float, float],
    sample_probability: float,
    rng: np.random.Generator,
) -> torch.Tensor:
    """Masks for a batch of ``n_crops`` global crops, shape (n_crops, patches), bool.

    ``int(n_crops * sample_probability)`` crops are masked; the k-th of them draws its ratio
    uniformly from the k-th of equal slices of ``ratio_min_max`` (so a batch always spans
    the range) and masks ``int(ratio * patches)`` patches. The crops are then shuffled.
    """
    n_patches = generator.n_patches
    n_masked_crops = int(n_crops * sample_probability)
    edges = np.linspace(*ratio_min_max, n_masked_crops + 1)
    masks = np.zeros((n_crops, n_patches), dtype=bool)
    for index in range(n_masked_crops):
        ratio = rng.uniform(edges[index], edges[index + 1])
        masks[index] = generator(int(ratio * n_patches), rng).ravel()
    return torch.from_numpy(masks[rng.permutation(n_crops)])
