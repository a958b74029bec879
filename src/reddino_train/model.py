"""Student and EMA teacher: a timm ViT backbone with an iBOT mask token, and DINO/iBOT heads."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models.vision_transformer import checkpoint_filter_fn
from napari_reddino.model_errors import CheckpointError as WeightsFileError
from napari_reddino.models import load_strict, read_weights
from torch import nn
from torch.utils.checkpoint import checkpoint

from .checkpoint import CheckpointError
from .config import ModelConfig, TrainConfig
from .heads import DinoHead, teacher_logits_dtype


def vit_architecture_args(model: ModelConfig, img_size: int) -> dict:
    """The timm arguments that fix the backbone's weights' shapes and initialisation."""
    args = {"img_size": img_size, "patch_size": model.patch_size, "init_values": model.layerscale, "num_classes": 0}
    for name in ("depth", "embed_dim", "num_heads"):
        if getattr(model, name) is not None:
            args[name] = getattr(model, name)
    return args


def create_vit(cfg: TrainConfig, *, with_weights: bool = True) -> nn.Module:
    """The training backbone: any input size (global and local crops), stochastic depth, and
    timm's weights where ``model.pretrained`` is "timm" (:func:`build_student` loads a file's)."""
    model = cfg.model
    args = vit_architecture_args(model, cfg.crops.global_size)
    vit = timm.create_model(model.arch, dynamic_img_size=True, drop_path_rate=model.drop_path_rate, **args)
    if with_weights and model.pretrained == "timm":
        # At its own input size (518 px for DINOv2's), not resampled by timm, which antialiases.
        trained = timm.create_model(model.arch, pretrained=True, **{k: v for k, v in args.items() if k != "img_size"})
        vit.load_state_dict(_position_embedding_fitted(trained.state_dict(), vit))
        del trained
    if model.drop_path_uniform and model.drop_path_rate > 0:
        for block in vit.blocks:
            block.drop_path1, block.drop_path2 = DropPath(model.drop_path_rate), DropPath(model.drop_path_rate)
    return vit


def load_vit_weights(vit: nn.Module, path: str | Path) -> torch.Tensor | None:
    """Load a timm or Meta DINOv2 ViT state dict (safetensors, or a tensors-only torch file); the
    position embedding is resampled when the file was trained at another input size. Returns
    the file's iBOT mask token where it has one (Meta's checkpoints do), which timm's
    conversion drops: it is also what tells timm that the file is in Meta's layout."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedWeightsError(f"model.pretrained={path}: there is no such file (give a .safetensors or .pth of "
                                     "ViT weights, \"timm\" for timm's weights of model.arch, or \"\" for random ones)")
    try:
        state = read_weights(path)
        mask_token = state.get("mask_token")
        load_strict(vit, checkpoint_filter_fn(_position_embedding_fitted(state, vit), vit), path, described(vit))
    except WeightsFileError as error:
        raise PretrainedWeightsError(f"model.pretrained: {error}") from error
    return mask_token


def _position_embedding_fitted(state: dict, vit: nn.Module) -> dict:
    """``state`` with a position embedding trained at another input size resized to ``vit``'s
    grid as DINOv2 resizes it (:func:`dinov2_resized_pos_embed`), as DINOv2 and RedDino began
    training at 224 px from weights trained at 518; timm's loader would antialias it, blurring
    the start. Its class (and register) slots, if any, stay as they are."""
    position = state.get("pos_embed")
    grid = tuple(vit.patch_embed.grid_size)
    if position is None or position.ndim != 3:
        return state
    for prefix in range(min(position.shape[1], 1 + vit.num_prefix_tokens) + 1):  # Meta's files keep a class slot
        side = math.isqrt(position.shape[1] - prefix)
        if side * side == position.shape[1] - prefix and side > 0:
            break
    else:
        return state  # not a square grid: timm's loader says what does not fit
    if (side, side) == grid:
        return state
    return {**state, "pos_embed": dinov2_resized_pos_embed(position, grid, (side, side), prefix)}


class PretrainedWeightsError(CheckpointError):
    """A ``model.pretrained`` file that cannot be read or does not fit the configured ViT."""


def described(vit: nn.Module) -> str:
    """The ViT in words, for a file that does not fit it: "a ViT of 2 blocks, width 384, patch 14"."""
    return f"a ViT of {len(vit.blocks)} blocks, width {vit.embed_dim}, patch {vit.patch_embed.patch_size[0]}"


class MaskableViT(nn.Module):
    """A timm ViT whose masked patch embeddings are replaced by a learned mask token (iBOT).

    With ``checkpointing``, each block keeps only its input for the backward pass and computes
    the rest again there: activation memory falls from one per block to one, for a second
    forward pass of the blocks (the dropped paths replay, as torch's checkpoint restores the RNG).
    """

    def __init__(self, vit: nn.Module, *, checkpointing: bool = False) -> None:
        super().__init__()
        self.vit = vit
        self.mask_token = nn.Parameter(torch.zeros(vit.embed_dim))
        self.checkpointing = checkpointing

    @property
    def n_prefix_tokens(self) -> int:
        return self.vit.num_prefix_tokens

    def forward(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, C, H, W) images -> (batch, prefix + patches, dim) tokens after the final norm.

        masks: (batch, patches) bool, True where the student sees the mask token.
        """
        vit = self.vit
        x = vit.patch_embed(images)  # (batch, rows, cols, dim) with dynamic_img_size
        if masks is not None:
            x = torch.where(masks.view(x.shape[:-1]).unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = vit.norm_pre(vit.patch_drop(self._pos_embed(x)))
        if self.checkpointing and torch.is_grad_enabled():  # the teacher's passes keep no activations anyway
            for block in vit.blocks:
                x = checkpoint(block, x, use_reentrant=False)
        else:
            x = vit.blocks(x)
        return vit.norm(x)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, rows, cols, dim) patches -> (batch, tokens, dim) with the prefix tokens and the
        position embedding, resized as DINOv2 resizes it for a grid other than the trained one
        (the local crops): timm's resize differs (antialiased, to the size rather than by scale)."""
        vit = self.vit
        batch, rows, cols, dim = x.shape
        if vit.pos_embed is None or (rows, cols) == tuple(vit.patch_embed.grid_size):
            return vit._pos_embed(x)
        n_prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
        position = dinov2_resized_pos_embed(vit.pos_embed, (rows, cols), vit.patch_embed.grid_size, n_prefix)
        prefix = [token.expand(batch, -1, -1) for token in (vit.cls_token, vit.reg_token) if token is not None]
        x = x.reshape(batch, rows * cols, dim)
        x = torch.cat([*prefix, x + position], 1) if vit.no_embed_class else torch.cat([*prefix, x], 1) + position
        return vit.pos_drop(x)


POS_EMBED_OFFSET = 0.1  # DINOv2's interpolate_offset: the scale is (new + 0.1) / old


def dinov2_resized_pos_embed(
    pos_embed: torch.Tensor, grid: tuple[int, int], trained_grid, n_prefix: int
) -> torch.Tensor:
    """DINOv2's resize of a (1, n_prefix + patches, dim) position embedding to ``grid``: bicubic
    by the scale (new + 0.1) / old, without antialiasing, in float32; the prefix entries as they are."""
    prefix, patches = pos_embed[:, :n_prefix], pos_embed[:, n_prefix:]
    dim = patches.shape[-1]
    patches = patches.float().reshape(1, *trained_grid, dim).permute(0, 3, 1, 2)
    scale = tuple((new + POS_EMBED_OFFSET) / old for new, old in zip(grid, trained_grid, strict=True))
    patches = F.interpolate(patches, scale_factor=scale, mode="bicubic", antialias=False)
    return torch.cat([prefix, patches.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)], 1)


@dataclass
class StudentOutputs:
    cls_logits: torch.Tensor  # (crops * batch, prototypes): global crops first, crop-major
    global_cls_tokens: torch.Tensor  # (2 * batch, dim), for KoLeo
    patch_logits: torch.Tensor  # (masked patches, prototypes), in tokens[masks] order


class DinoModel(nn.Module):
    """Backbone plus heads. ``forward`` is the student's pass, ``targets`` the teacher's."""

    def __init__(self, backbone: MaskableViT, dino_head: DinoHead, ibot_head: DinoHead | None) -> None:
        super().__init__()
        self.backbone = backbone
        self.dino_head = dino_head
        self.ibot_head = ibot_head  # None: iBOT shares the DINO head

    def forward(
        self, global_crops: torch.Tensor, local_crops: torch.Tensor, masks: torch.Tensor
    ) -> StudentOutputs:
        """One call for all crops, so DDP sees a single forward per backward."""
        tokens = self.backbone(global_crops, masks)
        cls_tokens = tokens[:, 0]
        if local_crops.numel():
            cls_tokens = torch.cat([cls_tokens, self.backbone(local_crops)[:, 0]])
        return StudentOutputs(
            cls_logits=self.dino_head(cls_tokens),
            global_cls_tokens=tokens[:, 0].clone(),  # not a view: FSDP warns about returning one
            patch_logits=self._ibot_logits(tokens, masks),
        )

    @torch.no_grad()
    def targets(self, global_crops: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher logits of the unmasked global crops: CLS (2 * batch, prototypes) and the
        patches the student sees masked (masked patches, prototypes)."""
        tokens = self.backbone(global_crops)
        dtype = teacher_logits_dtype(global_crops.device)
        return self.dino_head(tokens[:, 0], dtype), self._ibot_logits(tokens, masks, dtype)

    def _ibot_logits(self, tokens: torch.Tensor, masks: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        patches = tokens[:, self.backbone.n_prefix_tokens :][masks]
        return (self.ibot_head or self.dino_head)(patches, dtype)


def _head(cfg: TrainConfig, which: str, in_dim: int) -> DinoHead:
    head = getattr(cfg.heads, which)
    return DinoHead(in_dim, head.n_prototypes, head.hidden_dim, head.bottleneck_dim, head.n_layers)


def build_student(cfg: TrainConfig, *, with_weights: bool = True) -> DinoModel:
    """The student, with ``model.pretrained``'s weights unless ``with_weights`` is false (a
    resume, whose checkpoint has them: the file may be gone by then)."""
    backbone = MaskableViT(create_vit(cfg, with_weights=with_weights),
                           checkpointing=cfg.train.activation_checkpointing)
    if with_weights and cfg.model.pretrained not in ("", "timm"):
        mask_token = load_vit_weights(backbone.vit, cfg.model.pretrained)
        if mask_token is not None:  # Meta's (1, dim): continued training keeps it, as RedDino's did
            backbone.mask_token.data.copy_(mask_token.reshape(backbone.mask_token.shape))
    dim = backbone.vit.embed_dim
    ibot_head = _head(cfg, "ibot", dim) if cfg.heads.ibot_separate else None
    return DinoModel(backbone, _head(cfg, "dino", dim), ibot_head)


def clip_gradients(student: DinoModel, max_norm: float) -> float:
    """DINOv2's clipping: the backbone's and each head's gradient norm on its own, so a spike in
    a head's gradients does not shrink the backbone's update (``max_norm`` 0: none). Returns the
    norm of all the gradients before clipping, which is not finite when any gradient is not:
    clipping does not catch that, and one such step would turn every weight into NaN."""
    norms = []
    for part in (student.backbone, student.dino_head, student.ibot_head):
        if part is None:
            continue
        grads = [param.grad for param in part.parameters() if param.grad is not None]
        norm = (torch.nn.utils.clip_grad_norm_(part.parameters(), max_norm) if max_norm > 0
                else torch.nn.utils.get_total_norm(grads))
        norms.append(_full(norm).float())
    return float(torch.linalg.vector_norm(torch.stack(norms)))


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded (FSDP2 DTensor) result as one plain tensor, the same on every rank."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def use_explicit_attention(model: nn.Module) -> None:
    """Attention as two matrix products around a softmax instead of torch's fused kernel.

    For training on a CPU under bf16 autocast: there the fused kernel's backward runs 7-9x
    slower than the explicit form at cell-crop lengths (10-37 tokens) and 2x at 257 tokens,
    and took 40% of a ``reddino-cpu-small`` step (benchmarks/RESULTS.md); in fp32, and on
    GPUs, the fused kernel is as fast or faster.
    """
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False


def make_teacher(student: DinoModel) -> DinoModel:
    """A frozen copy in eval mode (no stochastic depth), updated only by ``update_teacher``."""
    teacher = copy.deepcopy(student).eval()
    teacher.requires_grad_(False)
    return teacher


@torch.no_grad()
def update_teacher(teacher: DinoModel, student: DinoModel, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, for every parameter."""
    torch._foreach_lerp_(list(teacher.parameters()), list(student.parameters()), 1 - momentum)
