"""Model registry: the notebook's scratch models (MLP, SimpleCNN, SimpleResNet, MiniVGG), its
"next steps" (PreActResNet18, ResNet-9 and airbench94's fast net, a small ViT) and the
ResNet18 transfer models. A model that sets layers from the training data before training
(airbench's whitening conv) has a ``data_init(images)`` method; the train stage calls it.

Builders take keyword-only arguments and always ``num_classes``; ``build_model`` passes a
builder only the ``model_args`` it declares (``use_bn`` means nothing to the MLP) and
refuses one it does not declare that is set away from its default.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cvplay.config import ModelArgs
from cvplay.errors import CvplayError

MODELS: dict[str, Callable[..., nn.Module]] = {}
# What each model eats: "images" (normalised 32x32 batches) or "features" (the features
# stage's frozen ResNet18 activations).
MODEL_INPUTS: dict[str, str] = {}


def register(
    name: str, *, inputs: str = "images"
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = builder
        MODEL_INPUTS[name] = inputs
        return builder

    return wrap


def build_model(name: str, *, num_classes: int, model_args: dict[str, Any]) -> nn.Module:
    if name not in MODELS:
        valid = ", ".join(sorted(MODELS))
        raise CvplayError(f"params.yaml: model: unknown model {name!r}; choose one of: {valid}")
    builder = MODELS[name]
    accepted = _params(builder)
    # A model_args.* key set away from its default that this model ignores is a mistake (a
    # run recorded as "zero_init_residual: true" that did not use it), so refuse it.
    for f in dataclasses.fields(ModelArgs):
        value = model_args.get(f.name, f.default)
        if f.name not in accepted and value != f.default:
            takers = ", ".join(m for m in sorted(MODELS) if f.name in _params(MODELS[m]))
            raise CvplayError(
                f"params.yaml: model_args.{f.name}: model {name!r} has no such option (it is "
                f"for {takers}); set it back to {str(f.default).lower()}"
            )
    kwargs = {k: v for k, v in model_args.items() if k in accepted}
    return builder(num_classes=num_classes, **kwargs)


def _params(builder: Callable[..., nn.Module]) -> Any:
    return inspect.signature(builder).parameters


def _conv_bn_relu(c_in: int, c_out: int, use_bn: bool, stride: int = 1) -> list[nn.Module]:
    # With BatchNorm the conv bias is redundant (BN's shift replaces it).
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=not use_bn)]
    if use_bn:
        layers.append(nn.BatchNorm2d(c_out))
    layers.append(nn.ReLU(inplace=True))
    return layers


class MLPBaseline(nn.Module):
    """Flatten -> two hidden fully connected layers with ReLU -> logits."""

    def __init__(self, *, num_classes: int, in_features: int = 3 * 32 * 32, hidden=(1024, 512)):
        super().__init__()
        h1, h2 = hidden
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, h1),
            nn.ReLU(inplace=True),
            nn.Linear(h1, h2),
            nn.ReLU(inplace=True),
            nn.Linear(h2, num_classes),
        )

    def forward(self, x):
        return self.net(x)


class ConvBlock(nn.Sequential):
    """Conv3x3 + BN + ReLU, then 2x2 max-pooling."""

    def __init__(self, c_in: int, c_out: int, *, use_bn: bool):
        super().__init__(*_conv_bn_relu(c_in, c_out, use_bn), nn.MaxPool2d(2))


class SimpleCNN(nn.Module):
    """Three ConvBlocks (32x32 -> 4x4) and a linear head.

    Widths 128/256/512: in 10 epochs 32/64/128 reached 0.80 val accuracy, 64/128/256 (4x
    the FLOPs) 0.83 and 96/192/384 (2.2x more) 0.84, each with train accuracy (augmented)
    near val: too narrow to fit CIFAR-10 in 10 epochs. See bench/ACCURACY.md.
    """

    def __init__(self, *, num_classes: int, use_bn: bool = True, widths=(128, 256, 512)):
        super().__init__()
        c1, c2, c3 = widths
        self.features = nn.Sequential(
            ConvBlock(3, c1, use_bn=use_bn),
            ConvBlock(c1, c2, use_bn=use_bn),
            ConvBlock(c2, c3, use_bn=use_bn),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c3 * 4 * 4, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


def _zero_(module: nn.Module) -> None:
    """Zero a residual branch's last layer (BN scale or conv), so the block starts as its
    shortcut (Goyal et al. 2017, "zero gamma"); its gradient is not zero, so it learns."""
    nn.init.zeros_(module.weight)
    if isinstance(module, nn.Conv2d) and module.bias is not None:
        nn.init.zeros_(module.bias)


class ResidualBlock(nn.Module):
    """Two 3x3 convs with an identity shortcut (1x1 conv when shape changes)."""

    def __init__(
        self, c_in: int, c_out: int, *, stride: int, use_bn: bool, zero_init: bool = False
    ):
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn_relu(c_in, c_out, use_bn, stride=stride),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=not use_bn),
            *([nn.BatchNorm2d(c_out)] if use_bn else []),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=not use_bn),
                *([nn.BatchNorm2d(c_out)] if use_bn else []),
            )
        self.relu = nn.ReLU(inplace=True)
        if zero_init:
            _zero_(self.body[-1])

    def forward(self, x):
        return self.relu(self.body(x) + self.shortcut(x))


class SimpleResNet(nn.Module):
    """Stem conv, three residual stages (the 2nd and 3rd halve the size), global pool, FC.

    Widths 64/128/256 (2.78 M params, 842 forward MFLOPs): in 10 epochs they reached 0.8920
    val accuracy (bf16) where 32/64/128 (697 k, 211 MFLOPs) reached 0.8772 (fp32; 0.8758 in
    bf16). See bench/ACCURACY.md.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        use_bn: bool = True,
        widths=(64, 128, 256),
        blocks: int = 2,
        zero_init_residual: bool = False,
    ):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn_relu(3, widths[0], use_bn))
        stages = []
        c_in = widths[0]
        for i, c_out in enumerate(widths):
            for b in range(blocks):
                stride = 2 if (i > 0 and b == 0) else 1
                stages.append(
                    ResidualBlock(
                        c_in, c_out, stride=stride, use_bn=use_bn, zero_init=zero_init_residual
                    )
                )
                c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))


class VGGBlock(nn.Sequential):
    """Several Conv3x3 + BN + ReLU, then 2x2 max-pooling."""

    def __init__(self, c_in: int, c_out: int, *, convs: int, use_bn: bool):
        layers: list[nn.Module] = []
        for i in range(convs):
            layers += _conv_bn_relu(c_in if i == 0 else c_out, c_out, use_bn)
        super().__init__(*layers, nn.MaxPool2d(2))


class MiniVGG(nn.Module):
    """Three VGGBlocks of two convs each (64, 128, 256 channels), global pool, linear head."""

    def __init__(self, *, num_classes: int, use_bn: bool = True, widths=(64, 128, 256)):
        super().__init__()
        blocks, c_in = [], 3
        for c_out in widths:
            blocks.append(VGGBlock(c_in, c_out, convs=2, use_bn=use_bn))
            c_in = c_out
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x):
        return self.head(self.pool(self.features(x)).flatten(1))


@register("mlp")
def mlp(*, num_classes: int = 10) -> nn.Module:
    return MLPBaseline(num_classes=num_classes)


@register("simplecnn")
def simplecnn(*, num_classes: int = 10, use_bn: bool = True) -> nn.Module:
    return SimpleCNN(num_classes=num_classes, use_bn=use_bn)


@register("simpleresnet")
def simpleresnet(
    *, num_classes: int = 10, use_bn: bool = True, zero_init_residual: bool = False
) -> nn.Module:
    return SimpleResNet(
        num_classes=num_classes, use_bn=use_bn, zero_init_residual=zero_init_residual
    )


@register("minivgg")
def minivgg(*, num_classes: int = 10, use_bn: bool = True) -> nn.Module:
    return MiniVGG(num_classes=num_classes, use_bn=use_bn)


@register("resnet18", inputs="features")
def resnet18_transfer(*, num_classes: int = 10, hidden: int = 256, dropout: float = 0.3):
    """layer4 + MLP head on the features stage's frozen stem..layer3 activations."""
    from cvplay.transfer import TransferHead

    return TransferHead(num_classes=num_classes, hidden=hidden, dropout=dropout)


@register("resnet18_finetune")
def resnet18_finetune(*, num_classes: int = 10, weights: str = "none", image_size: int = 64):
    """The whole ResNet18 (from features.weights) fine-tuned on images resized to image_size."""
    from cvplay.transfer import FineTuneResNet18

    return FineTuneResNet18(num_classes=num_classes, weights=weights, image_size=image_size)


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016): BN-ReLU-conv twice, identity shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int, zero_init: bool = False):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)
        if zero_init:
            _zero_(self.conv2)

    def forward(self, x):
        out = torch.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """PreAct ResNet-18 for 32x32 inputs: 3x3 stem, four stages of two blocks (64-512)."""

    def __init__(
        self, *, num_classes: int, widths=(64, 128, 256, 512), zero_init_residual: bool = False
    ):
        super().__init__()
        self.stem = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        blocks, c_in = [], widths[0]
        for i, c_out in enumerate(widths):
            for b in range(2):
                stride = 2 if i > 0 and b == 0 else 1
                blocks.append(PreActBlock(c_in, c_out, stride, zero_init=zero_init_residual))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c_in)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x):
        out = torch.relu(self.bn(self.blocks(self.stem(x))))
        return self.fc(nn.functional.adaptive_avg_pool2d(out, 1).flatten(1))


class Residual(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


class ResNet9(nn.Module):
    """The ResNet-9 of Page's "How to train your ResNet" (DAWNBench): prep 64, then
    128 (+residual), 256, 512 (+residual) conv-BN-ReLU-pool layers, global max-pool, and a
    linear head whose output is scaled by 0.125."""

    def __init__(self, *, num_classes: int, widths=(64, 128, 256, 512), scale: float = 0.125):
        super().__init__()
        c0, c1, c2, c3 = widths

        def pooled(c_in, c_out):
            return nn.Sequential(*_conv_bn_relu(c_in, c_out, True), nn.MaxPool2d(2))

        def res(c):
            return Residual(nn.Sequential(*_conv_bn_relu(c, c, True), *_conv_bn_relu(c, c, True)))

        self.net = nn.Sequential(
            nn.Sequential(*_conv_bn_relu(3, c0, True)),
            pooled(c0, c1),
            res(c1),
            pooled(c1, c2),
            pooled(c2, c3),
            res(c3),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(c3, num_classes, bias=False)
        self.scale = scale

    def forward(self, x):
        return self.fc(self.net(x)) * self.scale


class DiracConv(nn.Conv2d):
    """3x3 'same' conv without bias whose first ``c_in`` filters start as the identity
    (an implicit residual connection at initialisation, as airbench does)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(c_in, c_out, 3, padding="same", bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.dirac_(self.weight.data[: self.in_channels])


AIRBENCH_BN_MOMENTUM = 0.4  # airbench's running statistics: 0.6 old + 0.4 new per batch


def _fixed_scale_bn(c: int) -> nn.BatchNorm2d:
    # airbench's BatchNorm: learned shift only (the scale stays 1), a tiny eps, and running
    # statistics that follow the last few batches (only ~44 per epoch at batch 1024).
    bn = nn.BatchNorm2d(c, eps=1e-12, momentum=AIRBENCH_BN_MOMENTUM)
    bn.weight.requires_grad_(False)
    return bn


class AirbenchGroup(nn.Module):
    """conv -> 2x2 max-pool -> BN -> GELU -> conv -> BN -> GELU."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1, self.conv2 = DiracConv(c_in, c_out), DiracConv(c_out, c_out)
        self.norm1, self.norm2 = _fixed_scale_bn(c_out), _fixed_scale_bn(c_out)
        self.pool, self.act = nn.MaxPool2d(2), nn.GELU()

    def forward(self, x):
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


class Airbench(nn.Module):
    """The network of Keller Jordan's airbench94 (94% on CIFAR-10 in under 10 epochs): a
    frozen 2x2 whitening conv (24 channels, set from the training data by ``data_init``),
    three conv groups of widths 64/256/256, 3x3 max-pool, and a bias-free linear head whose
    output is scaled by 1/9. Dirac-initialised convs and BatchNorms with a fixed scale."""

    def __init__(self, *, num_classes: int, widths=(64, 256, 256), scale: float = 1 / 9):
        super().__init__()
        self.whiten = nn.Conv2d(3, 24, 2, bias=True)
        self.whiten.weight.requires_grad_(False)
        nn.init.zeros_(self.whiten.bias)
        c1, c2, c3 = widths
        self.groups = nn.Sequential(
            AirbenchGroup(24, c1), AirbenchGroup(c1, c2), AirbenchGroup(c2, c3)
        )
        self.head = nn.Linear(c3, num_classes, bias=False)
        self.scale = scale

    @torch.no_grad()
    def data_init(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the whitening filters from normalised training ``images`` (N x 3 x H x W):
        the eigenvectors of the covariance of their 2x2 patches, each scaled by
        1/sqrt(eigenvalue + eps), and their negatives (12 + 12 channels). The conv's output
        on those patches then has (near) unit variance along every principal direction."""
        kh, kw = self.whiten.kernel_size
        x = images.double()
        patches = x.unfold(2, kh, 1).unfold(3, kw, 1).permute(0, 2, 3, 1, 4, 5)
        flat = patches.reshape(-1, x.shape[1] * kh * kw)
        eigvals, eigvecs = torch.linalg.eigh(flat.T @ flat / len(flat))
        filters = (eigvecs.T / torch.sqrt(eigvals + eps)[:, None]).flip(0)
        filters = filters.view(-1, x.shape[1], kh, kw)
        w = self.whiten.weight
        w.copy_(torch.cat([filters, -filters]).to(w.dtype))

    def forward(self, x):
        x = self.groups(nn.functional.gelu(self.whiten(x)))
        x = nn.functional.max_pool2d(x, 3).flatten(1)
        return self.head(x) * self.scale


class ViT(nn.Module):
    """A small Vision Transformer: patch embedding (a strided conv), a class token, learned
    position embeddings, pre-norm encoder layers, and a linear head on the class token."""

    def __init__(
        self,
        *,
        num_classes: int,
        image_size: int = 32,
        patch: int = 4,
        dim: int = 192,
        depth: int = 6,
        heads: int = 3,
        mlp_ratio: int = 2,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        n = (image_size // patch) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim,
            heads,
            dim * mlp_ratio,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)  # B x N x dim
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], dim=1) + self.pos
        return self.head(self.norm(self.encoder(tokens))[:, 0])


@register("preactresnet18")
def preactresnet18(*, num_classes: int = 10, zero_init_residual: bool = False) -> nn.Module:
    return PreActResNet18(num_classes=num_classes, zero_init_residual=zero_init_residual)


@register("resnet9")
def resnet9(*, num_classes: int = 10) -> nn.Module:
    # No zero_init_residual: its branches end in a ReLU, whose gradient at 0 is 0, so a
    # branch started at zero would stay there.
    return ResNet9(num_classes=num_classes)


@register("airbench")
def airbench(*, num_classes: int = 10) -> nn.Module:
    return Airbench(num_classes=num_classes)


@register("vit_tiny")
def vit_tiny(*, num_classes: int = 10) -> nn.Module:
    """ViT with 4x4 patches (64 tokens + class token), width 192, 6 layers, 3 heads."""
    return ViT(num_classes=num_classes, patch=4, dim=192, depth=6, heads=3)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: nn.Module, example: torch.Tensor) -> int:
    """Forward FLOPs per sample (a multiply-add counts 2) of the convolutions and matmuls,
    counted by PyTorch's FlopCounterMode on ``example`` (a small batch) in eval mode.

    On CPU the attention products inside scaled_dot_product_attention are not counted
    (about 8% of vit_tiny's total); every other model here is fully counted. PyTorch's
    fused nn.TransformerEncoderLayer fast path (eval mode, no grad, an even number of
    heads) is a single op the counter does not see, so it is switched off while counting:
    the count is the same whatever the number of heads.
    """
    was_training, fastpath = model.training, torch.backends.mha.get_fastpath_enabled()
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        with counter, torch.no_grad():
            model(example)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        model.train(was_training)
    return counter.get_total_flops() // len(example)
