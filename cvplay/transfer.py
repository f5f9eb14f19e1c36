"""ResNet18 transfer learning: frozen stem..layer3 features, and a trainable layer4 + MLP head.

The features stage runs the frozen part once over every image and stores the activations
(fp16); ``model=resnet18`` then trains only ``layer4`` and the head on them, as the notebook
did. ``model=resnet18_finetune`` trains the whole network from images instead.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18

from cvplay import paths
from cvplay.config import FeaturesConfig
from cvplay.data import CIFAR10_MEAN, CIFAR10_STD, DeviceBatches, Normalize, load_packed
from cvplay.errors import CvplayError
from cvplay.io import save_torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESNET18_URL = ResNet18_Weights.DEFAULT.url
RESNET18_FILE = Path(ResNet18_Weights.DEFAULT.url).name  # resnet18-f37072fd.pth
FEATURE_CHANNELS = 256  # layer3's output


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def load_resnet18_weights(spec: str) -> dict[str, torch.Tensor] | None:
    """``imagenet`` (torch hub cache, downloaded when absent), a state_dict path, or ``none``."""
    if spec == "none":
        return None
    if spec == "imagenet":
        cached = hub_checkpoint_dir() / RESNET18_FILE
        try:
            return torch.hub.load_state_dict_from_url(
                RESNET18_URL,
                model_dir=str(hub_checkpoint_dir()),
                file_name=RESNET18_FILE,
                map_location="cpu",
                check_hash=True,
                weights_only=True,
                progress=False,
            )
        except (OSError, RuntimeError) as exc:  # URLError is an OSError
            reason = type(exc).__name__
            raise CvplayError(
                f"features.weights: imagenet: cannot download {RESNET18_FILE} ({reason}); "
                f"put {RESNET18_FILE} from {ResNet18_Weights.DEFAULT.url} at {cached}, "
                "or set features.weights to the path of a local ResNet18 state_dict "
                "('none' for random init)"
            ) from None
    path = Path(spec).expanduser()
    if not path.is_file():
        raise CvplayError(
            f"features.weights: {path} not found; use 'imagenet', 'none' or the path of a "
            "ResNet18 state_dict file"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses pickled code
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CvplayError(f"features.weights: {path}: not loadable safely ({first})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    return state


def build_resnet18(weights: str) -> nn.Module:
    """torchvision's ResNet18 with the weights loaded first (the head is replaced later)."""
    with torch.random.fork_rng():  # 'none': one fixed random backbone, global RNG untouched
        torch.manual_seed(0)
        net = resnet18(weights=None)
    state = load_resnet18_weights(weights)
    if state is not None:
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise CvplayError(
                f"features.weights: {weights}: not a ResNet18 state_dict ({first})"
            ) from None
    return net


class ImagenetInput(nn.Module):
    """CIFAR-normalised 32x32 batches -> ImageNet-normalised batches of ``image_size``."""

    def __init__(self, image_size: int):
        super().__init__()
        self.image_size = image_size
        c_mean, c_std = torch.tensor(CIFAR10_MEAN), torch.tensor(CIFAR10_STD)
        i_mean, i_std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        # x_img = x * c_std + c_mean;  out = (x_img - i_mean) / i_std  ==  x * scale + shift
        self.register_buffer("scale", (c_std / i_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer(
            "shift", ((c_mean - i_mean) / i_std).view(1, 3, 1, 1), persistent=False
        )

    def forward(self, x):
        x = x * self.scale + self.shift
        if x.shape[-1] != self.image_size:
            x = nn.functional.interpolate(
                x, size=self.image_size, mode="bilinear", align_corners=False, antialias=False
            )
        return x


def frozen_stem(net: nn.Module) -> nn.Sequential:
    """stem -> layer3 of a torchvision ResNet18, in eval mode with no gradients."""
    stem = nn.Sequential(
        net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3
    )
    stem.eval().requires_grad_(False)
    return stem


class TransferHead(nn.Module):
    """ResNet18's layer4 (trainable) + global pool + a small MLP head with Dropout."""

    def __init__(self, *, num_classes: int, hidden: int = 256, dropout: float = 0.3):
        super().__init__()
        self.layer4 = resnet18(weights=None).layer4
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(512, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, features):
        return self.head(self.pool(self.layer4(features)))


class FineTuneResNet18(nn.Module):
    """The whole ResNet18 trained from images (resized to ``image_size``), new linear head."""

    def __init__(self, *, num_classes: int, weights: str = "none", image_size: int = 64):
        super().__init__()
        self.input = ImagenetInput(image_size)
        self.net = build_resnet18(weights)
        self.net.fc = nn.Linear(self.net.fc.in_features, num_classes)

    def forward(self, x):
        return self.net(self.input(x))


@torch.no_grad()
def precompute_features(
    stem: nn.Module,
    images: torch.Tensor,
    *,
    image_size: int,
    batch_size: int,
    device: torch.device,
    flip: bool = False,
) -> torch.Tensor:
    """Run the frozen stem over uint8 N x 3 x 32 x 32 images; fp16 N x 256 x s x s on the CPU."""
    stem = stem.to(device).eval()
    to_input = ImagenetInput(image_size).to(device)
    normalize = Normalize(device)
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(device, non_blocking=True)
        if flip:
            x = x.flip(-1)
        # uint8 -> CIFAR-normalised (the training input convention) -> ImageNet input
        out.append(stem(to_input(normalize(x))).half().cpu())
    return torch.cat(out)


def run_features(cfg: FeaturesConfig, device: torch.device) -> dict[str, tuple[int, ...]]:
    """The features stage: stem..layer3 activations of every prepared image, and layer4's
    initial weights (the same backbone), under data/features/."""
    net = build_resnet18(cfg.weights)
    stem = frozen_stem(net)
    shapes = {}
    for split, src, dst in (
        ("train", paths.PACKED_TRAIN, paths.FEATURES_TRAIN),
        ("test", paths.PACKED_TEST, paths.FEATURES_TEST),
    ):
        packed = load_packed(src)
        common = {"image_size": cfg.image_size, "batch_size": cfg.batch_size, "device": device}
        payload = {
            "features": precompute_features(stem, packed.images, **common),
            "labels": packed.labels,
            "classes": packed.classes,
            "weights": cfg.weights,
            "image_size": cfg.image_size,
        }
        if split == "train" and cfg.views == 2:
            payload["flipped"] = precompute_features(stem, packed.images, flip=True, **common)
        save_torch(dst, payload)
        shapes[split] = tuple(payload["features"].shape)
    save_torch(paths.FEATURES_LAYER4, net.layer4.state_dict())
    return shapes


class FeatureLoader(DeviceBatches):
    """Batches of precomputed features; when training, each sample's view (plain or
    flipped) is drawn with p=0.5 if the features stage stored both."""

    def __init__(
        self,
        path: Path,
        indices: torch.Tensor | None,
        *,
        batch_size: int,
        device: torch.device,
        train: bool,
        seed: int,
        rank: int = 0,
        world: int = 1,
    ):
        if not path.exists():
            raise CvplayError(f"{path}: not found; run 'dvc repro features' first")
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if indices is None:
            indices = torch.arange(len(payload["labels"]))
        super().__init__(
            payload["labels"],
            indices,
            batch_size=batch_size,
            device=device,
            train=train,
            seed=seed,
            rank=rank,
            world=world,
        )
        self.classes = list(payload["classes"])
        self.features = payload["features"].to(device)
        flipped = payload.get("flipped")
        self.flipped = flipped.to(device) if (train and flipped is not None) else None

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flip = None
        if self.flipped is not None:
            flip = torch.rand(len(idx), device=idx.device, generator=self.generator) < 0.5
            flip = self.shard(flip)
        idx = self.shard(idx)
        x = self.features[idx]
        if flip is not None:
            x = torch.where(flip[:, None, None, None], self.flipped[idx], x)
        return x.float(), self.labels[idx]


def transfer_optimizer(model: TransferHead, lr_head: float, lr_layer4: float, weight_decay: float):
    """AdamW with separate learning rates for the head and layer4, as the notebook did."""
    return torch.optim.AdamW(
        [
            {"params": model.head.parameters(), "lr": lr_head},
            {"params": model.layer4.parameters(), "lr": lr_layer4},
        ],
        weight_decay=weight_decay,
    )
