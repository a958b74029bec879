"""Losses against values worked out by hand (see the comments), not against the code."""

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from reddino_train.losses import (
    DinoClsLoss,
    IbotPatchLoss,
    SoftmaxCentering,
    koleo_loss,
    make_teacher_targets,
    sinkhorn_knopp,
)
import reddino_train.losses.soft_cross_entropy as soft_cross_entropy_module
from reddino_train.losses.soft_cross_entropy import soft_cross_entropy

LN2, LN3 = math.log(2), math.log(3)
# With student temperature 0.1, logits [0.1 ln 2, 0, 0] give softmax [1/2, 1/4, 1/4]:
# cross-entropy ln 2 against the target [1, 0, 0] and 1.5 ln 2 against [1/2, 1/4, 1/4].
# Logits [0, 0, 0] give softmax [1/3] * 3: cross-entropy ln 3 against any target.
PEAKED = [0.1 * LN2, 0.0, 0.0]
FLAT = [0.0, 0.0, 0.0]
ONE_HOT = [1.0, 0.0, 0.0]
HALF = [0.5, 0.25, 0.25]
THIRDS = [1 / 3] * 3


def test_dino_loss_averages_pairs_of_different_views():
    # Crops x batch x prototypes. Batch item 0: student global 0 PEAKED, global 1 FLAT, local
    # PEAKED; teacher global 0 ONE_HOT, global 1 HALF. Batch item 1 is flat everywhere (ln 3).
    student = torch.tensor([[PEAKED, FLAT], [FLAT, FLAT], [PEAKED, FLAT]])
    teacher = torch.tensor([[ONE_HOT, THIRDS], [HALF, THIRDS]])
    # Pairs (teacher crop, student crop) for item 0, same-view pairs (0, 0) and (1, 1) skipped:
    # (0, 1): ln 3, (1, 0): 1.5 ln 2, (0, 2): ln 2, (1, 2): 1.5 ln 2.
    item0 = (LN3 + 1.5 * LN2 + LN2 + 1.5 * LN2) / 4
    expected = (item0 + LN3) / 2
    loss = DinoClsLoss(3, student_temp=0.1)(student, teacher)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_ibot_loss_weighs_each_crop_equally():
    # Crop 0 masks patches 1 and 2, crop 1 masks patch 3, crop 2 is not masked.
    masks = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)
    student = torch.tensor([PEAKED, FLAT, PEAKED])  # rows in the order of tokens[masks]
    teacher = torch.tensor([ONE_HOT, ONE_HOT, HALF])
    # Crop 0: (ln 2 + ln 3) / 2; crop 1: 1.5 ln 2; crop 2: 0; mean over the 3 crops.
    expected = ((LN2 + LN3) / 2 + 1.5 * LN2 + 0.0) / 3
    loss = IbotPatchLoss(3, student_temp=0.1)(student, teacher, masks)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_soft_cross_entropy_in_chunks_matches_log_softmax(monkeypatch, dtype):
    # 1000 float32 elements a chunk: the 37 rows of 300 prototypes go in 13 chunks of 3 rows
    monkeypatch.setattr(soft_cross_entropy_module, "_CHUNK_ELEMENTS", 1000)
    generator = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(37, 300, generator=generator)).to(dtype).requires_grad_()
    targets = 0.9 * torch.softmax(torch.randn(37, 300, generator=generator) / 0.05, dim=-1)  # rows sum to 0.9
    weights = torch.rand(37, generator=generator)
    unchanged = logits.detach().clone()
    expected = -(targets * torch.log_softmax(logits.float() / 0.1, dim=-1)).sum(dim=-1)
    (expected * weights).sum().backward()
    expected_grad, logits.grad = logits.grad, None
    losses = soft_cross_entropy(logits, targets, 0.1)
    (losses * weights).sum().backward()
    torch.testing.assert_close(losses, expected.detach(), rtol=1e-6, atol=1e-5)
    assert logits.grad.dtype == dtype
    torch.testing.assert_close(logits.grad.float(), expected_grad.float(), rtol=1e-5, atol=1e-5)
    assert torch.equal(logits.detach(), unchanged)  # float32 logits are not scaled in place


def test_koleo_uses_each_point_nearest_neighbour():
    # Unit vectors at 0, 60 and 180 degrees: nearest-neighbour distances 1, 1 and sqrt(3).
    angles = np.radians([0.0, 60.0, 180.0])
    points = torch.tensor(np.stack([np.cos(angles), np.sin(angles)], axis=1), dtype=torch.float32)
    expected = -(0 + 0 + math.log(math.sqrt(3))) / 3
    assert koleo_loss(points).item() == pytest.approx(expected, abs=1e-6)
    scaled = points * torch.tensor([[2.0], [5.0], [0.5]])  # rows are normalised first
    assert koleo_loss(scaled).item() == pytest.approx(expected, abs=1e-6)


def test_softmax_centering_uses_then_updates_the_centre():
    centering = SoftmaxCentering(2, momentum=0.9)
    # softmax([ln 3, 0]) = [3/4, 1/4]; softmax([0, 0]) = [1/2, 1/2]
    probs = centering(torch.tensor([[LN3, 0.0], [0.0, 0.0]]), temp=1.0)
    torch.testing.assert_close(probs, torch.tensor([[0.75, 0.25], [0.5, 0.5]]))
    # centre = 0.9 * 0 + 0.1 * batch mean [ln 3 / 2, 0]
    torch.testing.assert_close(centering.center, torch.tensor([0.05 * LN3, 0.0]))
    # next batch [0, 0] at temperature 0.5: softmax([-0.1 ln 3, 0]) = [1, 3^0.1] / (1 + 3^0.1)
    probs = centering(torch.tensor([[0.0, 0.0]]), temp=0.5)
    torch.testing.assert_close(probs, torch.tensor([[1.0, 3**0.1]]) / (1 + 3**0.1))


def test_sinkhorn_knopp_by_hand():
    # exp([[ln 3, 0], [0, 0]]) = [[3, 1], [1, 1]]. One iteration: prototypes (columns) to 1/2
    # each -> [[3/8, 1/4], [1/8, 1/4]]; rows to 1/2 each -> [[3/10, 1/5], [1/6, 1/3]]; rows
    # scaled to sum to 1 -> [[3/5, 2/5], [1/3, 2/3]]. A second iteration gives
    # [[12/19, 7/19], [4/11, 7/11]], whose columns sum to 208/209 and 210/209 (-> 1 each).
    logits = torch.tensor([[LN3, 0.0], [0.0, 0.0]])
    one = sinkhorn_knopp(logits, temp=1.0, n_iterations=1)
    torch.testing.assert_close(one, torch.tensor([[3 / 5, 2 / 5], [1 / 3, 2 / 3]]))
    two = sinkhorn_knopp(logits, temp=1.0, n_iterations=2)
    torch.testing.assert_close(two, torch.tensor([[12 / 19, 7 / 19], [4 / 11, 7 / 11]]))
    three = sinkhorn_knopp(logits, temp=1.0, n_iterations=3)  # DINOv2's count, the default here and in training
    assert not torch.allclose(three, two)
    torch.testing.assert_close(sinkhorn_knopp(logits, temp=1.0), three, rtol=0, atol=0)
    torch.testing.assert_close(make_teacher_targets("sinkhorn_knopp", 2, 0.9)(logits, 1.0), three, rtol=0, atol=0)


def test_sinkhorn_knopp_balances_prototypes():
    # multiples of 1/8, so that adding 1000 below is exact in float32
    logits = torch.randint(-16, 16, (12, 4), generator=torch.Generator().manual_seed(0)) / 8
    probs = sinkhorn_knopp(logits, temp=0.1, n_iterations=200)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(12))  # each row is a distribution
    torch.testing.assert_close(probs.sum(dim=0), torch.full((4,), 12 / 4), atol=1e-4, rtol=0)
    # adding a constant to every logit changes nothing, and huge logits do not overflow
    torch.testing.assert_close(sinkhorn_knopp(logits + 1000.0, temp=0.1), sinkhorn_knopp(logits, temp=0.1))
    unchanged = logits.clone()
    sinkhorn_knopp(logits, temp=0.1)
    assert torch.equal(logits, unchanged)  # worked on a copy
    uniform = sinkhorn_knopp(torch.zeros(3, 5), temp=0.04)
    torch.testing.assert_close(uniform, torch.full((3, 5), 0.2))


def _distributed_targets(rank: int, store: str, logits: torch.Tensor, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    rows = logits.split([3, 7])[rank]  # unequal, as each rank's count of masked patches (iBOT)
    centering = make_teacher_targets("softmax_center", logits.shape[1], center_momentum=0.5)
    centering(rows, temp=0.1)
    result = {"sinkhorn": sinkhorn_knopp(rows, temp=0.1), "center": centering.center.clone()}
    torch.save(result, f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


def test_targets_see_the_global_batch_across_ranks(tmp_path):
    logits = torch.randn(10, 6, generator=torch.Generator().manual_seed(1))
    out = str(tmp_path / "targets")
    mp.spawn(_distributed_targets, args=(str(tmp_path / "store"), logits, out), nprocs=2)
    ranks = [torch.load(f"{out}.{rank}") for rank in range(2)]
    full = sinkhorn_knopp(logits, temp=0.1)
    torch.testing.assert_close(torch.cat([r["sinkhorn"] for r in ranks]), full)
    expected_center = 0.5 * logits.mean(dim=0)  # momentum 0.5 from a zero centre
    for r in ranks:
        torch.testing.assert_close(r["center"], expected_center)
