import math

import pytest
import timm
import torch
from torch import nn

from reddino_train.heads import DinoHead
from reddino_train.param_groups import apply_schedule, build_param_groups
from reddino_train.schedules import WarmupCosine


def test_head_logits_are_scaled_cosine_similarities():
    head = DinoHead(3, 3, n_layers=1, bottleneck_dim=3)
    with torch.no_grad():
        head.mlp[0].weight.copy_(torch.eye(3))
        head.mlp[0].bias.zero_()
        head.last_layer.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 2, 0], [1, 1, 0]]))
        head.last_layer.gain.copy_(torch.tensor([1.0, 1.0, 2.0]))
    # x / |x| = [0.6, 0.8, 0]; unit prototypes [1, 0, 0], [0, 1, 0], [1, 1, 0] / sqrt(2)
    logits = head(torch.tensor([[3.0, 4.0, 0.0]]))
    torch.testing.assert_close(logits, torch.tensor([[0.6, 0.8, 2 * 1.4 / math.sqrt(2)]]))


def test_head_shape_and_layers():
    head = DinoHead(8, 10, hidden_dim=16, bottleneck_dim=4, n_layers=3)
    assert [type(m).__name__ for m in head.mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert head(torch.randn(2, 5, 8)).shape == (2, 5, 10)


def test_last_layer_stays_frozen_for_the_first_iterations():
    torch.manual_seed(0)
    head = DinoHead(6, 12, hidden_dim=8, bottleneck_dim=4)
    optimizer = torch.optim.AdamW(build_param_groups(head))
    lr = WarmupCosine(0.1, 0.1, 0.1, total_iters=10)
    last_layer_lr = WarmupCosine(0.1, 0.1, 0.1, total_iters=10, frozen_iters=2)
    x = torch.randn(16, 6)
    for iteration in range(3):
        apply_schedule(optimizer, lr(iteration), weight_decay=0.04, last_layer_lr=last_layer_lr(iteration))
        last_before = [p.detach().clone() for p in head.last_layer.parameters()]
        mlp_before = head.mlp[0].weight.detach().clone()
        optimizer.zero_grad()
        head(x).logsumexp(dim=-1).mean().backward()
        optimizer.step()
        last_changed = any(not p.equal(b) for p, b in zip(head.last_layer.parameters(), last_before))
        assert last_changed == (iteration >= 2)
        assert not head.mlp[0].weight.equal(mlp_before)


def test_param_group_multipliers():
    backbone = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=28, depth=3)
    backbone.mask_token = nn.Parameter(torch.zeros(1, 384))
    student = nn.ModuleDict({"backbone": backbone, "head": DinoHead(384, 16, 32, 8)})
    teacher_only = nn.Linear(2, 2).requires_grad_(False)
    student["frozen"] = teacher_only
    groups = build_param_groups(student, layer_decay=0.5, patch_embed_lr_mult=0.2)
    group_of = {id(p): g for g in groups for p in g["params"]}
    named = dict(student.named_parameters())
    assert sum(len(g["params"]) for g in groups) == len(group_of) == len(named) - 2

    # 3 blocks: embeddings 0.5^4, block i 0.5^(3 - i), after the blocks 1; weight decay on all
    # but biases, norms and LayerScale (DINOv2: tokens and the weight-norm gain are decayed)
    expected = {  # name: (lr multiplier, weight decay multiplier, last layer)
        "backbone.cls_token": (0.0625, 1.0, False),
        "backbone.pos_embed": (0.0625, 1.0, False),
        "backbone.reg_token": (0.0625, 1.0, False),  # the registers are embeddings too
        "backbone.mask_token": (0.0625, 1.0, False),
        "backbone.patch_embed.proj.weight": (0.0125, 1.0, False),
        "backbone.patch_embed.proj.bias": (0.0125, 0.0, False),
        "backbone.blocks.0.attn.qkv.weight": (0.125, 1.0, False),
        "backbone.blocks.0.ls1.gamma": (0.125, 0.0, False),
        "backbone.blocks.1.norm1.weight": (0.25, 0.0, False),
        "backbone.blocks.2.mlp.fc1.weight": (0.5, 1.0, False),
        "backbone.blocks.2.mlp.fc1.bias": (0.5, 0.0, False),
        "backbone.norm.weight": (1.0, 0.0, False),
        "head.mlp.0.weight": (1.0, 1.0, False),
        "head.last_layer.weight": (1.0, 1.0, True),
        "head.last_layer.gain": (1.0, 1.0, True),
    }
    for name, (lr_mult, wd_mult, last) in expected.items():
        group = group_of[id(named[name])]
        assert group["lr_multiplier"] == pytest.approx(lr_mult), name
        assert (group["wd_multiplier"], group["is_last_layer"]) == (wd_mult, last), name

    optimizer = torch.optim.AdamW(groups)
    apply_schedule(optimizer, lr=1e-3, weight_decay=0.04, last_layer_lr=0.0)
    qkv = group_of[id(named["backbone.blocks.0.attn.qkv.weight"])]
    assert (qkv["lr"], qkv["weight_decay"]) == (pytest.approx(1.25e-4), pytest.approx(0.04))
    assert group_of[id(named["head.last_layer.weight"])]["lr"] == 0.0
