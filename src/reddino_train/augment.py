"""Multi-crop augmentation: two global crops and N local crops of one image, normalised.

``dinov2``: DINOv2's pipeline. Random resized crops (bicubic) with horizontal flips; colour
jitter (p 0.8) and grayscale (p 0.2) on every crop; Gaussian blur on global crop 2 (p 0.9)
and the local crops (p 0.5); solarisation on global crop 2 (p 0.2). These blur probabilities
are the ones DINOv2's released models were trained with: its GaussianBlur inverts p, so the
written 1.0 / 0.1 / 0.5 of DINO act as 0.0 / 0.9 / 0.5 (facebookresearch/dinov2 PR 411,
facebookresearch/dinov3 issue 286).

``rbc``: RedDino's scheme in torchvision terms. Blood cells have no preferred orientation, so
every crop gets a uniformly random flip/quarter-turn (one of the 8 symmetries of the square),
and each crop draws ``crops.pixel_augmentations_per_crop`` pixel augmentations from the
``crops.pixel_augmentations`` pool, each applied with probability 0.85. RedDino drew 4 of 33
Albumentations transforms (Snarci/RedDino, train/dinov2/data/augmentations.py); 13 of its
kinds have a match here, with Albumentations' default strengths where this module makes them
(noise, downscale, gamma, RGB shift, channel dropout). The other 20 (weather, glass, motion and
median blurs, emboss, CLAHE, FancyPCA, tone curves, ringing, ISO noise, JPEG at quality 99) do
not; so the RedDino recipes draw 2 of the 13, which fires each kind in 13 % of crops, near
RedDino's 4/33 x 0.85 = 10 %. ``autocontrast`` and ``grayscale`` are no RedDino kinds: a grey
crop teaches the model to ignore the stain colour that tells hypochromic cells apart (the
``reddino-cpu-small`` recipe keeps grayscale, as it was benchmarked).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.transforms import v2

from .config import CropsConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RBC_PIXEL_AUGMENTATION_PROBABILITY = 0.85

Transform = Callable[[torch.Tensor], torch.Tensor]


class RandomSquareSymmetry(nn.Module):
    """One of the 8 symmetries of the square (quarter turns, with or without a flip), uniformly;
    exact (no interpolation). The same distribution as random horizontal and vertical flips
    followed by a random quarter turn, in one step."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        symmetry = int(torch.randint(8, ()))
        if symmetry >= 4:
            image = image.flip(-1)
        return torch.rot90(image, symmetry % 4, dims=(-2, -1))


class Normalize(nn.Module):
    """uint8 C x H x W -> float32 scaled to [0, 1] and standardised per channel, in one pass
    (a fifth of the time of ``v2.ToDtype`` and ``v2.Normalize`` on a 48-px crop)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean, std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
        self.scale, self.shift = 1.0 / (255.0 * std), mean / std

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(image).float().mul_(self.scale).sub_(self.shift)


class RandomSubset(nn.Module):
    """Apply ``n`` distinct transforms of ``pool`` in random order, each with probability ``p``."""

    def __init__(self, pool: Sequence[Transform], n: int, p: float) -> None:
        super().__init__()
        self.pool, self.n, self.p = list(pool), n, p

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        for index in torch.randperm(len(self.pool))[: self.n].tolist():
            if torch.rand(()) < self.p:
                image = self.pool[index](image)
        return image


@dataclass(frozen=True)
class MultiCrop:
    """``image`` (PIL or uint8 tensor C x H x W) -> {"global_crops": [2], "local_crops": [N]}."""

    global_transforms: tuple[Transform, Transform]
    local_transform: Transform
    n_local: int

    def __call__(self, image) -> dict[str, list[torch.Tensor]]:
        image = v2.functional.to_image(image)
        return {
            "global_crops": [transform(image) for transform in self.global_transforms],
            "local_crops": [self.local_transform(image) for _ in range(self.n_local)],
        }


def make_multicrop(crops: CropsConfig) -> MultiCrop:
    builders = {"dinov2": _dinov2_multicrop, "rbc": _rbc_multicrop}
    return builders[crops.augmentation](crops)


def geometry(size: int, scale: tuple[float, float], all_symmetries: bool) -> v2.Compose:
    """Random resized crop plus horizontal flip, or plus all 8 flips/quarter-turns."""
    crop = v2.RandomResizedCrop(size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    return v2.Compose([crop, RandomSquareSymmetry() if all_symmetries else v2.RandomHorizontalFlip(0.5)])


def _normalize() -> Normalize:
    return Normalize(IMAGENET_MEAN, IMAGENET_STD)


def _blur(p: float) -> v2.RandomApply:
    return v2.RandomApply([v2.GaussianBlur(kernel_size=9, sigma=(0.1, 2.0))], p=p)


def _dinov2_multicrop(crops: CropsConfig) -> MultiCrop:
    colour = v2.Compose([
        v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
    ])
    global_geometry = geometry(crops.global_size, crops.global_scale, all_symmetries=False)
    first = v2.Compose([global_geometry, colour, _normalize()])  # blur p 0.0 as trained
    second = v2.Compose([global_geometry, colour, _blur(0.9), v2.RandomSolarize(128, p=0.2), _normalize()])
    local = v2.Compose([
        geometry(crops.local_size, crops.local_scale, all_symmetries=False), colour, _blur(0.5), _normalize(),
    ])
    return MultiCrop((first, second), local, crops.local_number)


class GaussianNoise(nn.Module):
    """Zero-mean Gaussian noise on every pixel and channel, its variance drawn from
    ``variance`` (8-bit levels squared; Albumentations' GaussNoise default)."""

    variance = (10.0, 50.0)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        low, high = self.variance
        sigma = (low + (high - low) * torch.rand(())).sqrt()
        return (image.float() + sigma * torch.randn(image.shape)).round_().clamp_(0, 255).to(image.dtype)


class Downscale(nn.Module):
    """Down to ``scale`` of the size and back, nearest neighbour both ways: a coarser camera
    (Albumentations' Downscale default)."""

    scale = 0.25

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        size = list(image.shape[-2:])
        small = [max(1, round(side * self.scale)) for side in size]
        nearest = v2.InterpolationMode.NEAREST
        return v2.functional.resize(v2.functional.resize(image, small, interpolation=nearest), size,
                                    interpolation=nearest)


class RandomGamma(nn.Module):
    """Gamma drawn from ``gamma`` (Albumentations' RandomGamma default, 80-120 %)."""

    gamma = (0.8, 1.2)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        low, high = self.gamma
        return v2.functional.adjust_gamma(image, float(low + (high - low) * torch.rand(())))


class RGBShift(nn.Module):
    """Each channel shifted by its own whole number of levels within ``limit`` either way
    (Albumentations' RGBShift default)."""

    limit = 20

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        shift = torch.randint(-self.limit, self.limit + 1, (image.shape[-3], 1, 1))
        return (image.to(torch.int16) + shift).clamp_(0, 255).to(image.dtype)


class ChannelDropout(nn.Module):
    """One channel, drawn at random, set to 0 (Albumentations' ChannelDropout default)."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        image = image.clone()
        image[..., int(torch.randint(image.shape[-3], ())), :, :] = 0
        return image


RBC_PIXEL_POOL: dict[str, Callable[[], Transform]] = {
    "colour_jitter": lambda: v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.1),
    "blur": lambda: v2.GaussianBlur(kernel_size=5, sigma=(0.1, 2.0)),
    "sharpness": lambda: v2.RandomAdjustSharpness(sharpness_factor=2.0, p=1.0),
    "autocontrast": lambda: v2.RandomAutocontrast(p=1.0),
    "equalize": lambda: v2.RandomEqualize(p=1.0),
    "posterize": lambda: v2.RandomPosterize(bits=4, p=1.0),
    "solarize": lambda: v2.RandomSolarize(threshold=128, p=1.0),
    "invert": lambda: v2.RandomInvert(p=1.0),
    "channel_permutation": lambda: v2.RandomChannelPermutation(),
    "grayscale": lambda: v2.RandomGrayscale(p=1.0),
    "channel_dropout": ChannelDropout,
    "gaussian_noise": GaussianNoise,
    "downscale": Downscale,
    "gamma": RandomGamma,
    "rgb_shift": RGBShift,
}


def _rbc_multicrop(crops: CropsConfig) -> MultiCrop:
    pixels = RandomSubset(
        [RBC_PIXEL_POOL[name]() for name in crops.pixel_augmentations],
        crops.pixel_augmentations_per_crop,
        RBC_PIXEL_AUGMENTATION_PROBABILITY,
    )
    global_crop = v2.Compose([
        geometry(crops.global_size, crops.global_scale, all_symmetries=True), pixels, _normalize(),
    ])
    local = v2.Compose([
        geometry(crops.local_size, crops.local_scale, all_symmetries=True), pixels, _normalize(),
    ])
    return MultiCrop((global_crop, global_crop), local, crops.local_number)
