import math

import huggingface_hub.constants
import pytest
import safetensors.torch
import timm
import torch
from timm.layers import resample_abs_pos_embed

from _model_fixtures import hub_cache, publish_to_cache  # noqa: F401  (fixture)
from reddino_train.config import load_config
from reddino_train.config import config_from_dict, config_to_dict
from reddino_train.model import (
    build_student,
    clip_gradients,
    create_vit,
    dinov2_resized_pos_embed,
    make_teacher,
    update_teacher,
    use_explicit_attention,
    vit_architecture_args,
)

# LayerScale 1 so the blocks, not just the embeddings, shape the outputs of the tiny model
TINY = ["model.layerscale=1.0", "model.drop_path_rate=0.0"]


def test_masked_patches_see_only_the_mask_token():
    torch.manual_seed(0)
    student = build_student(load_config("tiny", TINY)).eval()
    torch.nn.init.normal_(student.backbone.mask_token)
    images = torch.randn(2, 3, 56, 56)
    everything = torch.ones(2, 16, dtype=torch.bool)
    masked = student.backbone(images, everything)
    assert torch.allclose(masked[0], masked[1], atol=1e-5)  # the two images became the same input
    assert (masked[0, 1] - masked[0, 2]).abs().max() > 1e-3  # masked patches keep their places (mask, then position)
    unmasked = student.backbone(images)
    assert (unmasked[0] - unmasked[1]).abs().max() > 0.1
    assert unmasked.shape == (2, 1 + 16, 384)


def test_student_outputs_follow_crops_and_masks():
    torch.manual_seed(0)
    cfg = load_config("tiny", TINY)
    student = build_student(cfg)
    masks = torch.zeros(4, 16, dtype=torch.bool)
    masks[1, :5] = masks[3, 7:9] = True
    global_crops, local_crops = torch.randn(4, 3, 56, 56), torch.randn(6, 3, 28, 28)
    out = student(global_crops, local_crops, masks)
    assert out.cls_logits.shape == (4 + 6, 64)
    assert out.global_cls_tokens.shape == (4, 384)
    assert out.patch_logits.shape == (7, 64)
    # The global crops' CLS first, in their order, then the local crops': the DINO loss pairs views
    # by position. iBOT's logits are those of the masked patches, seen masked.
    backbone, head, prefix = student.backbone, student.dino_head, student.backbone.n_prefix_tokens
    with torch.no_grad():
        tokens = backbone(global_crops, masks)
        torch.testing.assert_close(out.cls_logits[:4], head(tokens[:, 0]))
        torch.testing.assert_close(out.cls_logits[4:], head(backbone(local_crops)[:, 0]))
        torch.testing.assert_close(out.global_cls_tokens, tokens[:, 0])
        torch.testing.assert_close(out.patch_logits, head(tokens[:, prefix:][masks]))
        teacher_cls, teacher_patches = make_teacher(student).targets(global_crops, masks)
        unmasked = backbone(global_crops)  # the teacher sees the whole crops
        torch.testing.assert_close(teacher_cls, head(unmasked[:, 0]))
        torch.testing.assert_close(teacher_patches, head(unmasked[:, prefix:][masks]))
    assert (teacher_patches - out.patch_logits).abs().max() > 1e-3


def test_separate_ibot_head_has_its_own_prototypes():
    cfg = load_config("tiny", [*TINY, "heads.ibot_separate=true", "heads.ibot.n_prototypes=48"])
    student = build_student(cfg)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, :3] = True
    out = student(torch.randn(2, 3, 56, 56), torch.randn(0), masks)
    assert out.patch_logits.shape == (3, 48) and out.cls_logits.shape == (2, 64)


def test_explicit_attention_gives_the_fused_kernels_outputs_and_gradients():
    torch.manual_seed(0)
    student = build_student(load_config("tiny", TINY))
    images, masks = torch.randn(3, 3, 56, 56), torch.zeros(3, 16, dtype=torch.bool)
    masks[0, :4] = True

    def outputs_and_gradients():
        student.zero_grad()
        out = student(images, torch.randn(0), masks)
        (out.cls_logits.square().mean() + out.patch_logits.square().mean()).backward()
        grads = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
        return out.cls_logits.detach(), grads

    fused = outputs_and_gradients()
    use_explicit_attention(student)
    attentions = [module for module in student.modules() if hasattr(module, "fused_attn")]
    assert len(attentions) == 2 and not any(module.fused_attn for module in attentions)
    explicit = outputs_and_gradients()
    for a, b in zip(fused, explicit):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_teacher_is_a_frozen_copy_updated_by_ema():
    student = build_student(load_config("tiny"))
    teacher = make_teacher(student)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    before = teacher.backbone.mask_token.detach().clone()
    with torch.no_grad():
        student.backbone.mask_token.fill_(1.0)
    update_teacher(teacher, student, momentum=0.75)
    assert torch.allclose(teacher.backbone.mask_token, 0.75 * before + 0.25)
    assert torch.equal(teacher.dino_head.last_layer.weight, student.dino_head.last_layer.weight)


def test_pretrained_weights_load_from_safetensors_and_torch_files(tmp_path):
    torch.manual_seed(1)
    source = build_student(load_config("tiny")).backbone.vit.state_dict()
    safetensors.torch.save_file(source, tmp_path / "vit.safetensors")
    torch.save(source, tmp_path / "vit.pth")
    for name in ("vit.safetensors", "vit.pth"):
        torch.manual_seed(2)
        loaded = build_student(load_config("tiny", [f"model.pretrained={tmp_path / name}"]))
        state = loaded.backbone.vit.state_dict()
        assert all(torch.equal(state[key], source[key]) for key in source)
        assert not loaded.backbone.mask_token.any()  # timm's weights have none: it starts at zero
    # Meta's DINOv2 checkpoints carry their trained iBOT mask token, shaped (1, dim): it is kept.
    mask_token = torch.randn(1, source["cls_token"].shape[-1])
    torch.save({**source, "mask_token": mask_token}, tmp_path / "meta.pth")
    loaded = build_student(load_config("tiny", [f"model.pretrained={tmp_path / 'meta.pth'}"]))
    assert torch.equal(loaded.backbone.mask_token, mask_token[0])


@pytest.mark.parametrize("arch", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"])
def test_weights_trained_at_another_size_start_from_dinov2_s_resize_of_their_position_embedding(tmp_path, arch):
    # DINOv2 and RedDino began training at 224 px from weights trained at 518, resizing the
    # position embedding bicubically by (16 + 0.1) / 37 without antialiasing; timm's loader antialiases.
    # (timm's register models keep no class slot in it.)
    cfg = load_config("tiny", [f"model.arch={arch}"])
    torch.manual_seed(1)
    larger = timm.create_model(cfg.model.arch, **vit_architecture_args(cfg.model, 2 * cfg.crops.global_size))
    source = larger.state_dict()
    prefix = 0 if larger.no_embed_class else 1
    safetensors.torch.save_file(source, tmp_path / "larger.safetensors")
    torch.save({**source, "mask_token": torch.zeros(1, source["cls_token"].shape[-1])}, tmp_path / "meta.pth")
    for name in ("larger.safetensors", "meta.pth") if prefix else ("larger.safetensors",):
        vit = build_student(load_config("tiny", [f"model.arch={arch}", f"model.pretrained={tmp_path / name}"])).backbone.vit
        grid = tuple(vit.patch_embed.grid_size)
        assert grid == (4, 4) and tuple(larger.patch_embed.grid_size) == (8, 8)
        assert torch.equal(vit.pos_embed, dinov2_resized_pos_embed(source["pos_embed"], grid, (8, 8), prefix))
        antialiased = resample_abs_pos_embed(source["pos_embed"], list(grid), num_prefix_tokens=prefix, antialias=True)
        assert (vit.pos_embed - antialiased).abs().max() > 1e-3
        assert torch.equal(vit.blocks[0].attn.qkv.weight, source["blocks.0.attn.qkv.weight"])


def test_timm_s_weights_are_taken_at_their_own_size_and_resized_as_dinov2_does(hub_cache, tmp_path, monkeypatch):
    # timm's DINOv2 weights (518 px, 37 x 37 patches), from a Hugging Face cache as timm downloads them.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))  # read at import, as HF_HUB_CACHE is
    cfg = load_config("tiny", ["model.pretrained=timm"])
    torch.manual_seed(3)
    published = timm.create_model(cfg.model.arch, **{key: value for key, value in vit_architecture_args(
        cfg.model, 0).items() if key != "img_size"})
    assert tuple(published.patch_embed.grid_size) == (37, 37)
    source = published.state_dict()
    (tmp_path / "published").mkdir()
    safetensors.torch.save_file(source, tmp_path / "published" / "model.safetensors")
    publish_to_cache(tmp_path / "published", hub_cache, timm.models.get_pretrained_cfg(cfg.model.arch).hf_hub_id)
    vit = build_student(cfg).backbone.vit
    assert torch.equal(vit.pos_embed, dinov2_resized_pos_embed(source["pos_embed"], (4, 4), (37, 37), 1))
    assert torch.equal(vit.blocks[1].mlp.fc2.weight, source["blocks.1.mlp.fc2.weight"])


def test_meta_s_layout_of_a_model_with_registers_is_converted_to_timm_s(tmp_path):
    # Meta's files keep the registers apart and a class-token slot in the position embedding;
    # timm converts them when it sees the mask token, which must still be there when it looks.
    registers = "model.arch=vit_small_patch14_reg4_dinov2"
    torch.manual_seed(1)
    timm_layout = build_student(load_config("tiny", [registers])).backbone.vit.state_dict()
    meta_layout = {key: value for key, value in timm_layout.items() if key not in ("reg_token", "pos_embed")}
    meta_layout |= {"register_tokens": timm_layout["reg_token"], "mask_token": torch.randn(1, 384),
                    "pos_embed": torch.cat([torch.zeros(1, 1, 384), timm_layout["pos_embed"]], dim=1)}
    torch.save(meta_layout, tmp_path / "meta_reg4.pth")
    torch.manual_seed(2)
    loaded = build_student(load_config("tiny", [registers, f"model.pretrained={tmp_path / 'meta_reg4.pth'}"]))
    state = loaded.backbone.vit.state_dict()
    assert state.keys() == timm_layout.keys()
    assert all(torch.equal(state[key], timm_layout[key]) for key in timm_layout)
    assert torch.equal(loaded.backbone.mask_token, meta_layout["mask_token"][0])


def test_activation_checkpointing_keeps_a_fraction_for_the_backward_pass_and_gives_the_same_gradients():
    images = torch.randn(8, 3, 56, 56)
    kept, gradients = {}, {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        student = build_student(load_config("tiny", ["model.depth=4", "model.drop_path_rate=0.3",
                                                     f"train.activation_checkpointing={str(checkpointing).lower()}"]))
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            tokens = student.backbone(images)
        kept[checkpointing] = sum(sizes)
        tokens.square().mean().backward()
        gradients[checkpointing] = {name: p.grad for name, p in student.backbone.named_parameters() if p.grad is not None}
    assert kept[True] < 0.2 * kept[False]
    saved = config_to_dict(load_config("tiny"))
    del saved["train"]["activation_checkpointing"]  # a run saved before the key existed kept every activation
    assert config_from_dict(saved).train.activation_checkpointing is False
    assert gradients[True].keys() == gradients[False].keys()
    for name, gradient in gradients[False].items():
        torch.testing.assert_close(gradients[True][name], gradient, rtol=1e-5, atol=1e-7)


def test_stochastic_depth_drops_at_the_same_rate_in_every_block_as_dinov2_does():
    uniform = create_vit(load_config("tiny", ["model.drop_path_rate=0.2", "model.depth=3"]))
    assert [(block.drop_path1.drop_prob, block.drop_path2.drop_prob) for block in uniform.blocks] == [(0.2, 0.2)] * 3
    ramp = create_vit(load_config("tiny", ["model.drop_path_rate=0.2", "model.depth=3", "model.drop_path_uniform=false"]))
    rates = [getattr(block.drop_path1, "drop_prob", 0.0) for block in ramp.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2])
    saved = config_to_dict(load_config("tiny"))
    del saved["model"]["drop_path_uniform"]  # a run saved before the key existed ran timm's ramp
    assert config_from_dict(saved).model.drop_path_uniform is False


def test_gradients_are_clipped_per_part_so_a_head_spike_spares_the_backbone():
    student = build_student(load_config("tiny"))
    for name, param in student.named_parameters():
        param.grad = torch.full_like(param, 1e3 if name.startswith("dino_head") else 1e-4)
    backbone_before = [param.grad.clone() for param in student.backbone.parameters()]
    unclipped = torch.linalg.vector_norm(torch.stack([param.grad.norm() for param in student.parameters()]))
    assert clip_gradients(student, 3.0) == pytest.approx(float(unclipped), rel=1e-5)  # the norm before clipping
    for param, before in zip(student.backbone.parameters(), backbone_before):
        assert torch.equal(param.grad, before)  # its own norm is far below 3
    head_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in student.dino_head.parameters()]))
    assert head_norm == pytest.approx(3.0, rel=1e-4)


def test_prototype_logits_are_cosines_times_gains_and_stay_in_the_autocast_dtype():
    from reddino_train.heads import PrototypeLayer

    torch.manual_seed(0)
    layer = PrototypeLayer(8, 64)
    torch.nn.init.uniform_(layer.gain, 0.5, 2.0)
    x = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    prototypes = layer.weight / layer.weight.norm(dim=1, keepdim=True)
    expected = (x @ prototypes.T) * layer.gain  # cosine to each prototype, times its gain
    torch.testing.assert_close(layer(x), expected)
    layer(x).sum().backward()  # each gain's gradient: the sum of its cosines
    torch.testing.assert_close(layer.gain.grad, (x @ prototypes.T).sum(dim=0).detach())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(x)
    # not float32: a float32 copy of iBOT's 21,000 x 131,072 logits (RedDino's ViT-S recipe) is 10 GiB
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), expected.detach(), rtol=2e-2, atol=2e-2)
    # The directions start as nn.Linear's (as DINOv2's do): uniform within 1/sqrt(256) at a bottleneck of 256.
    directions = PrototypeLayer(256, 4096).weight.detach()
    assert directions.abs().max() <= 1 / 16
    assert directions.std().item() == pytest.approx(1 / (16 * math.sqrt(3)), rel=0.01)


def test_under_bf16_the_teacher_s_logits_are_float32_on_a_cpu_and_the_student_s_stay_bf16():
    torch.manual_seed(0)
    student = build_student(load_config("tiny", TINY))
    teacher = make_teacher(student)
    crops, masks = torch.randn(4, 3, 56, 56), torch.zeros(4, 16, dtype=torch.bool)
    masks[0, :6] = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cls, patches = teacher.targets(crops, masks)
        out = student(crops, torch.randn(4, 3, 28, 28), masks)
    assert cls.dtype == patches.dtype == torch.float32 and patches.shape == (6, 64)
    assert out.cls_logits.dtype == out.patch_logits.dtype == torch.bfloat16
    with torch.no_grad():
        exact_cls, _ = teacher.targets(crops, masks)
    torch.testing.assert_close(cls, exact_cls, rtol=0.05, atol=0.05)  # the backbone ran in bf16


@pytest.mark.parametrize(("device", "autocast", "expected"), [
    ("cuda", torch.bfloat16, torch.float16),  # DINOv2's: as fine as fp16, as small as bf16
    ("cpu", torch.bfloat16, torch.float32),
    ("cuda", torch.float16, None),  # already fp16
    ("cuda", None, None),  # fp32 training
])
def test_the_teacher_s_logits_dtype_follows_the_device_and_the_autocast(monkeypatch, device, autocast, expected):
    from reddino_train.heads import teacher_logits_dtype

    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device_type: autocast is not None)
    monkeypatch.setattr(torch, "get_autocast_dtype", lambda device_type: autocast or torch.float32)
    assert teacher_logits_dtype(torch.device(device)) == expected


def bicubic_row(at: float, size: int = 16) -> float:
    """The row-index field (row r holds r) of ``size`` rows, read at ``at`` with Keys' cubic
    kernel of a = -0.75 over the 4 nearest rows, edge rows repeated beyond the grid."""
    def weight(t: float, a: float = -0.75) -> float:
        t = abs(t)
        return (a + 2) * t**3 - (a + 3) * t**2 + 1 if t <= 1 else a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a

    base = math.floor(at)
    return sum(weight(at - row) * min(max(row, 0), size - 1) for row in range(base - 1, base + 3))


@pytest.mark.parametrize("arch", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"])
def test_local_crops_take_the_position_embedding_as_dinov2_resizes_it(arch):
    """DINOv2 resizes the 16x16 grid of a 224-px crop to the 7x7 of a 98-px one by the scale
    7.1/16, bicubic (torch's, a = -0.75), not antialiased: output row i samples the old rows at
    (i + 0.5) * 16 / 7.1 - 0.5 (16/7 without the offset), and alternating rows keep their
    contrast (antialiasing would average them away)."""
    backbone = build_student(load_config("tiny", [f"model.arch={arch}", "crops.global_size=224",
                                                  "crops.local_size=98"])).backbone
    vit = backbone.vit
    first_patch = 0 if vit.no_embed_class else vit.num_prefix_tokens
    row = torch.arange(16.0).repeat_interleave(16)
    with torch.no_grad():
        vit.pos_embed[0, first_patch:, 0] = row
        vit.pos_embed[0, first_patch:, 1] = (-1.0) ** row
        tokens = backbone._pos_embed(torch.zeros(2, 7, 7, 384))
    assert tokens.shape == (2, vit.num_prefix_tokens + 49, 384)
    patches = tokens[0, vit.num_prefix_tokens:].reshape(7, 7, 384)
    torch.testing.assert_close(patches[:, 3, 0], torch.tensor([bicubic_row((i + 0.5) * 16 / 7.1 - 0.5) for i in range(7)]))
    assert patches[1:6, 3, 1].abs().mean() > 0.5
    class_position = torch.zeros(384) if vit.no_embed_class else vit.pos_embed[0, 0]
    torch.testing.assert_close(tokens[1, 0], vit.cls_token[0, 0] + class_position)
    with torch.no_grad():  # at the trained grid, the embedding as it is
        torch.testing.assert_close(backbone._pos_embed(torch.zeros(1, 16, 16, 384))[0, vit.num_prefix_tokens:],
                                   vit.pos_embed[0, first_patch:])
