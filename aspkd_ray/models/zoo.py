"""The model zoo: teachers and students created by name from one registry.

Every model splits like timm's: `forward_features(x)` gives the latent map S̄ (the layer before
flatten / global pooling) and `forward_head(f)` the logits. `embed(x)` is S̄ as one vector per
image, the space in which active selection and the kNN pseudo-labels work. Inputs are float
tensors in [0, 1], N x C x H x W; each model normalises internally.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

_REGISTRY: dict[str, Callable[..., ZooModel]] = {}
_ROLES: dict[str, str] = {}


def register(name: str, role: str) -> Callable:
    def deco(fn: Callable[..., ZooModel]) -> Callable[..., ZooModel]:
        _REGISTRY[name] = fn
        _ROLES[name] = role
        return fn

    return deco


def list_models(role: str | None = None) -> list[str]:
    """Registered names; role 'teacher', 'student' or None for all."""
    return sorted(n for n in _REGISTRY if role is None or _ROLES[n] == role)


def create_model(name: str, *, num_classes: int, in_chans: int, image_size: int,
                 pretrained: bool = False) -> ZooModel:
    """Create a registered model. `pretrained=True` asks timm's hub (needs network)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown architecture {name!r}; expected one of: "
                         f"{', '.join(list_models())}.")
    model = _REGISTRY[name](num_classes=num_classes, in_chans=in_chans, image_size=image_size,
                            pretrained=pretrained)
    model.arch = {"name": name, "num_classes": num_classes, "in_chans": in_chans,
                  "image_size": image_size}
    return model


class ZooModel(nn.Module):
    """Base: forward = forward_head(forward_features(x)); embed = flat latent."""

    arch: dict

    def __init__(self, in_chans: int) -> None:
        super().__init__()
        mean = torch.full((1, in_chans, 1, 1), 0.5)
        self.register_buffer("norm_mean", mean, persistent=False)
        self.register_buffer("norm_std", torch.full_like(mean, 0.25), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.norm_mean) / self.norm_std

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


class DigitsCNN(ZooModel):
    """Two conv blocks and an MLP head, sized for 28 x 28 digits on CPUs."""

    def __init__(self, num_classes: int, in_chans: int, image_size: int, width: int = 32,
                 hidden: int = 128) -> None:
        super().__init__(in_chans)
        w = width
        self.features = nn.Sequential(*_conv_bn(in_chans, w), *_conv_bn(w, w), nn.MaxPool2d(2),
                                      *_conv_bn(w, 2 * w), *_conv_bn(2 * w, 2 * w),
                                      nn.MaxPool2d(2))
        side = image_size // 4
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(2 * w * side * side,
                                                                           hidden),
                                  nn.ReLU(inplace=True), nn.Dropout(0.3),
                                  nn.Linear(hidden, num_classes))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.normalize(x))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)


class PatchCNN(ZooModel):
    """A patchify stem (stride 4) and two stride-2 blocks pooled to 4 x 4: a few MFLOPs per
    224 px image, so paper-sized pools can be run on CPUs (scale tests, CPU smoke runs)."""

    def __init__(self, num_classes: int, in_chans: int, image_size: int, width: int = 32) -> None:
        super().__init__(in_chans)
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, w // 2, 4, stride=4), nn.BatchNorm2d(w // 2), nn.ReLU(True),
            nn.Conv2d(w // 2, w, 3, stride=2, padding=1), nn.BatchNorm2d(w), nn.ReLU(True),
            nn.Conv2d(w, w, 3, stride=2, padding=1), nn.BatchNorm2d(w), nn.ReLU(True),
            nn.AdaptiveAvgPool2d(4))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(w * 16, num_classes))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.normalize(x))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)


class AlexNet(ZooModel):
    """AlexNet with a width multiplier (Half-AlexNet: width 0.5, half the conv filters and
    half the fully-connected units). Below 64 px the stem is the usual CIFAR variant
    (3 x 3 stride-1 convolutions), since 11 x 11 stride 4 leaves nothing of a 32 px image."""

    def __init__(self, num_classes: int, in_chans: int, image_size: int,
                 width: float = 1.0) -> None:
        super().__init__(in_chans)
        c = [max(8, int(round(f * width))) for f in (64, 192, 384, 256, 256)]
        fc = max(16, int(round(4096 * width)))
        small = image_size < 64
        stem = (nn.Conv2d(in_chans, c[0], 3, stride=1, padding=1) if small
                else nn.Conv2d(in_chans, c[0], 11, stride=4, padding=2))
        pool = (lambda: nn.MaxPool2d(2)) if small else (lambda: nn.MaxPool2d(3, stride=2))
        self.features = nn.Sequential(
            stem, nn.ReLU(inplace=True), pool(),
            nn.Conv2d(c[0], c[1], 5 if not small else 3, padding=2 if not small else 1),
            nn.ReLU(inplace=True), pool(),
            nn.Conv2d(c[1], c[2], 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c[2], c[3], 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c[3], c[4], 3, padding=1), nn.ReLU(inplace=True), pool(),
            nn.AdaptiveAvgPool2d(4 if small else 6),
        )
        side = 4 if small else 6
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.5),
                                  nn.Linear(c[4] * side * side, fc), nn.ReLU(inplace=True),
                                  nn.Dropout(0.5), nn.Linear(fc, fc), nn.ReLU(inplace=True),
                                  nn.Linear(fc, num_classes))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.normalize(x))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)


class TimmModel(ZooModel):
    """A timm network behind the same split. CNNs embed the flat pre-pooling map (S̄ as in the
    paper); transformers embed the pooled pre-logits token, as their map is token-shaped."""

    def __init__(self, timm_name: str, num_classes: int, in_chans: int, image_size: int,
                 pretrained: bool, token_latent: bool, **kwargs) -> None:
        import timm

        super().__init__(in_chans)
        self.net = timm.create_model(timm_name, pretrained=pretrained, num_classes=num_classes,
                                     in_chans=in_chans, **kwargs)
        self.token_latent = token_latent
        cfg = getattr(self.net, "pretrained_cfg", {}) or {}
        mean, std = cfg.get("mean"), cfg.get("std")
        if mean and len(mean) == in_chans:
            self.norm_mean.copy_(torch.tensor(mean).view(1, -1, 1, 1))
            self.norm_std.copy_(torch.tensor(std).view(1, -1, 1, 1))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(self.normalize(x))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.net.forward_head(features)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        f = self.forward_features(x)
        if self.token_latent:
            return self.net.forward_head(f, pre_logits=True)
        return f.flatten(1)


@register("digits_cnn", "teacher")
def _digits_cnn(num_classes: int, in_chans: int, image_size: int, pretrained: bool) -> ZooModel:
    return DigitsCNN(num_classes, in_chans, image_size, width=32, hidden=128)


@register("digits_cnn_small", "student")
def _digits_cnn_small(num_classes: int, in_chans: int, image_size: int,
                      pretrained: bool) -> ZooModel:
    return DigitsCNN(num_classes, in_chans, image_size, width=16, hidden=64)


@register("patch_cnn", "student")
def _patch_cnn(num_classes: int, in_chans: int, image_size: int, pretrained: bool) -> ZooModel:
    return PatchCNN(num_classes, in_chans, image_size, width=32)


@register("alexnet", "teacher")
def _alexnet(num_classes: int, in_chans: int, image_size: int, pretrained: bool) -> ZooModel:
    return AlexNet(num_classes, in_chans, image_size, width=1.0)


@register("half_alexnet", "student")
def _half_alexnet(num_classes: int, in_chans: int, image_size: int,
                  pretrained: bool) -> ZooModel:
    return AlexNet(num_classes, in_chans, image_size, width=0.5)


@register("resnet50", "teacher")
def _resnet50(num_classes: int, in_chans: int, image_size: int, pretrained: bool) -> ZooModel:
    return TimmModel("resnet50", num_classes, in_chans, image_size, pretrained, False)


@register("resnet18", "student")
def _resnet18(num_classes: int, in_chans: int, image_size: int, pretrained: bool) -> ZooModel:
    return TimmModel("resnet18", num_classes, in_chans, image_size, pretrained, False)


@register("vit_b", "teacher")
def _vit_b(num_classes: int, in_chans: int, image_size: int, pretrained: bool) -> ZooModel:
    return TimmModel("vit_base_patch16_224", num_classes, in_chans, image_size, pretrained,
                     True, img_size=image_size)


@register("fastvit", "student")
def _fastvit(num_classes: int, in_chans: int, image_size: int, pretrained: bool) -> ZooModel:
    return TimmModel("fastvit_t8", num_classes, in_chans, image_size, pretrained, True)
