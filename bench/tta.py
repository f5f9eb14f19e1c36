"""Score one checkpoint's validation and test splits under each test-time augmentation.

    python -m bench.tta                                  # models/best.pt on data/packed
    python -m bench.tta --checkpoint PATH --data DIR     # DIR holds packed/{train,test}.pt

The validation split is the one the checkpoint was trained with (its saved seed and
data.val_split). Prints one markdown row per ``eval.tta`` view set: val accuracy, test
accuracy, forward passes per image. Nothing is trained or written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from cvplay import paths
from cvplay.data import load_packed, split_indices
from cvplay.engine import pick_device, predict_logits
from cvplay.errors import CvplayError
from cvplay.evaluate import load_checkpoint
from cvplay.loaders import PackedLoader
from cvplay.models import MODEL_INPUTS

VIEWS = {"none": 1, "flip": 2, "flip_translate": 6}  # forward passes per image


def score(checkpoint: Path, data: Path, batch_size: int = 500) -> dict[str, tuple[float, float]]:
    """{tta: (val acc, test acc)} for each view set of ``cvplay.engine.infer``."""
    device = pick_device()
    model, cfg, _ = load_checkpoint(checkpoint, device)
    if MODEL_INPUTS[cfg.model] != "images":
        raise CvplayError(f"{checkpoint}: model {cfg.model!r} takes features, not images")
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).eval()
    train = load_packed(data / "packed" / "train.pt")
    test = load_packed(data / "packed" / "test.pt")
    _, val_idx = split_indices(len(train.labels), cfg.data.val_split, cfg.seed)
    common = {"batch_size": batch_size, "device": device, "train": False, "seed": 0}
    common["channels_last"] = cfg.train.channels_last
    loaders = [
        PackedLoader(train, val_idx, **common),
        PackedLoader(test, torch.arange(len(test.labels)), **common),
    ]
    out = {}
    for tta in VIEWS:
        accs = []
        for loader in loaders:
            logits, labels = predict_logits(model, loader, tta=tta)
            accs.append((logits.argmax(1) == labels).float().mean().item())
        out[tta] = (accs[0], accs[1])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=Path(paths.BEST))
    ap.add_argument("--data", type=Path, default=Path("data"))
    args = ap.parse_args(argv)
    try:
        figures = score(args.checkpoint, args.data)
    except CvplayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("| TTA | val acc | test acc | forward passes per image |\n|---|---|---|---|")
    for tta, (val, test) in figures.items():
        print(f"| `{tta}` | {val:.4f} | {test:.4f} | {VIEWS[tta]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
