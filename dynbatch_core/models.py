"""CIFAR-style ResNets, built by name.

    import torch
    from dynbatch_core.models import build_model, count_parameters
    model = build_model("resnet20", in_channels=1, num_classes=10, norm="group")
    logits = model(torch.randn(8, 1, 28, 28))   # -> (8, 10)
    count_parameters(model)

Two families, both with a 3x3 stride-1 stem and no max-pool, so 28x28 and 32x32 inputs keep their
resolution into the first stage; adaptive average pooling lets any input of 8x8 or more through.

* He et al. (2016) CIFAR ResNets: 3 stages of width 16/32/64, n BasicBlocks per stage (depth 6n+2),
  parameter-free "option A" shortcuts (strided subsample, zero-pad the new channels).
* ImageNet-width ResNets as in kuangliu/pytorch-cifar: 4 stages of width 64/128/256/512 with
  1x1-conv projection shortcuts where the shape changes.

Parameter counts for in_channels=3, num_classes=10, norm="batch":

    name        depth  block       parameters
    resnet8         8  Basic           75,290
    resnet20       20  Basic          269,722
    resnet32       32  Basic          464,154
    resnet56       56  Basic          853,018
    resnet18       18  Basic       11,173,962
    resnet34       34  Basic       21,282,122
    resnet50       50  Bottleneck  23,520,842
    resnet101     101  Bottleneck  42,512,970
    resnet152     152  Bottleneck  58,156,618

norm="batch" uses BatchNorm2d, "group" GroupNorm with 8 groups, "none" no normalisation (convs then get
a bias); "none" gives a model without batch statistics, for tests that compare gradients exactly.
Without normalisation the residual sums would grow with depth, so with "none" the last conv of every residual
branch starts at zero (as Fixup and torchvision's zero_init_residual do): each block starts as the identity.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

NORM_CHOICES: tuple[str, ...] = ("batch", "group", "none")
GROUP_NORM_GROUPS = 8


def _norm(norm: str, channels: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(GROUP_NORM_GROUPS, channels)
    return nn.Identity()


def _conv(in_channels: int, out_channels: int, kernel_size: int, stride: int, norm: str) -> nn.Conv2d:
    # A bias is redundant before a norm layer (the norm's shift replaces it), but needed without one.
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                     padding=kernel_size // 2, bias=(norm == "none"))


class PadShortcut(nn.Module):
    """He et al.'s option A: subsample spatially by `stride`, zero-pad the extra channels evenly."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        extra = out_channels - in_channels
        self.channel_padding = (extra // 2, extra - extra // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, *self.channel_padding))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int, norm: str, shortcut: nn.Module):
        super().__init__()
        self.conv1 = _conv(in_channels, planes, 3, stride, norm)
        self.norm1 = _norm(norm, planes)
        self.conv2 = _conv(planes, planes, 3, 1, norm)
        self.norm2 = _norm(norm, planes)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int, norm: str, shortcut: nn.Module):
        super().__init__()
        self.conv1 = _conv(in_channels, planes, 1, 1, norm)
        self.norm1 = _norm(norm, planes)
        self.conv2 = _conv(planes, planes, 3, stride, norm)
        self.norm2 = _norm(norm, planes)
        self.conv3 = _conv(planes, planes * self.expansion, 1, 1, norm)
        self.norm3 = _norm(norm, planes * self.expansion)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = F.relu(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem conv, one stage per width (the first at stride 1, the rest at stride 2), pool, linear head.

    `shortcut_kind` is "pad" (option A, no parameters) or "projection" (1x1 conv + norm) for blocks that
    change shape; blocks that keep it use the identity.
    """

    def __init__(self, block: type[BasicBlock | Bottleneck], blocks_per_stage: list[int],
                 stage_widths: list[int], shortcut_kind: str, in_channels: int, num_classes: int, norm: str):
        super().__init__()
        self.norm = norm
        self.shortcut_kind = shortcut_kind
        self.channels = stage_widths[0]  # output channels of the last layer built so far
        self.stem = nn.Sequential(_conv(in_channels, self.channels, 3, 1, norm),
                                  _norm(norm, self.channels), nn.ReLU(inplace=True))
        self.stages = nn.Sequential(*[
            self._make_layer(block, width, num_blocks, stride=1 if index == 0 else 2)
            for index, (width, num_blocks) in enumerate(zip(stage_widths, blocks_per_stage))
        ])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(self.channels, num_classes)
        self._initialise()

    def _make_layer(self, block: type[BasicBlock | Bottleneck], planes: int, num_blocks: int,
                    stride: int) -> nn.Sequential:
        blocks = []
        for block_stride in [stride] + [1] * (num_blocks - 1):
            out_channels = planes * block.expansion
            if block_stride == 1 and self.channels == out_channels:
                shortcut = nn.Identity()
            elif self.shortcut_kind == "pad":
                shortcut = PadShortcut(self.channels, out_channels, block_stride)
            else:
                shortcut = nn.Sequential(_conv(self.channels, out_channels, 1, block_stride, self.norm),
                                         _norm(self.norm, out_channels))
            blocks.append(block(self.channels, planes, block_stride, self.norm, shortcut))
            self.channels = out_channels
        return nn.Sequential(*blocks)

    def _initialise(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if self.norm == "none":
            for module in self.modules():
                if isinstance(module, BasicBlock):
                    nn.init.zeros_(module.conv2.weight)
                elif isinstance(module, Bottleneck):
                    nn.init.zeros_(module.conv3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(torch.flatten(self.pool(x), 1))


_CIFAR_WIDTHS = [16, 32, 64]
_IMAGENET_WIDTHS = [64, 128, 256, 512]
# name -> (block, blocks per stage, stage widths, shortcut for shape changes)
_ARCHITECTURES = {
    "resnet8": (BasicBlock, [1, 1, 1], _CIFAR_WIDTHS, "pad"),
    "resnet20": (BasicBlock, [3, 3, 3], _CIFAR_WIDTHS, "pad"),
    "resnet32": (BasicBlock, [5, 5, 5], _CIFAR_WIDTHS, "pad"),
    "resnet56": (BasicBlock, [9, 9, 9], _CIFAR_WIDTHS, "pad"),
    "resnet18": (BasicBlock, [2, 2, 2, 2], _IMAGENET_WIDTHS, "projection"),
    "resnet34": (BasicBlock, [3, 4, 6, 3], _IMAGENET_WIDTHS, "projection"),
    "resnet50": (Bottleneck, [3, 4, 6, 3], _IMAGENET_WIDTHS, "projection"),
    "resnet101": (Bottleneck, [3, 4, 23, 3], _IMAGENET_WIDTHS, "projection"),
    "resnet152": (Bottleneck, [3, 8, 36, 3], _IMAGENET_WIDTHS, "projection"),
}
MODEL_NAMES: tuple[str, ...] = tuple(_ARCHITECTURES)


def build_model(name: str, *, in_channels: int = 3, num_classes: int = 10, norm: str = "batch") -> nn.Module:
    """A freshly initialised ResNet on the CPU; deterministic under torch.manual_seed."""
    if name not in _ARCHITECTURES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    if norm not in NORM_CHOICES:
        raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORM_CHOICES)}")
    block, blocks_per_stage, stage_widths, shortcut_kind = _ARCHITECTURES[name]
    return ResNet(block, blocks_per_stage, stage_widths, shortcut_kind, in_channels, num_classes, norm)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
