"""``python -m cvplay predict``: classify image files with a trained checkpoint.

Each file takes the path a test image takes through the pipeline, by the same code:
- decoding: the prepare stage's ``decode_image`` (any mode to RGB, 16-bit gray's top 8 bits,
  transparency onto black, bilinear resize to the checkpoint's ``data.image_size``), with
  truncated files refused as prepare refuses them;
- the evaluation normalisation (``cvplay.data.Normalize``), and the test-time augmentation
  of evaluation (the checkpoint's ``eval.tta``, ``cvplay.engine.tta_views``) when the model
  takes images;
- ``model=resnet18`` (transfer: trained on precomputed features) gets the features stage's
  frozen stem..layer3 rebuilt from the checkpoint's ``features.weights``.

Files are decoded and classified ``batch_size`` at a time (one model call per batch and TTA
view), so memory stays flat for any number of files.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cvplay import paths
from cvplay.data import Normalize
from cvplay.engine import infer, pick_device, tta_views
from cvplay.evaluate import load_checkpoint
from cvplay.models import MODEL_INPUTS
from cvplay.prepare import BadImageError, decode_image, is_image_file, strict_truncation
from cvplay.transfer import build_resnet18, frozen_stem, precompute_features

DEFAULT_TOPK = 3
DEFAULT_BATCH_SIZE = 256


@dataclass
class Prediction:
    """One input file: its top classes, most probable first, or why it could not be used."""

    path: str
    top: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        return {"path": self.path, "top": [{"class": c, "prob": p} for c, p in self.top]}


@dataclass
class Input:
    """A file to classify; ``error`` when the argument itself is unusable (missing path,
    folder without images)."""

    path: Path
    error: str | None = None


def list_inputs(args: Iterable[str | Path]) -> list[Input]:
    """The files to classify, in argument order.

    A file argument is taken as given (a non-image file then fails with its reason). A folder
    is walked recursively in sorted order; inside it, hidden files and folders and files
    without an image extension are skipped as the prepare stage skips them.
    """
    inputs = []
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if is_image_file(p)
                and not any(part.startswith(".") for part in p.relative_to(path).parts[:-1])
            )
            inputs.extend(Input(p) for p in found)
            if not found:
                inputs.append(Input(path, "no image files in this folder"))
        elif path.exists():
            inputs.append(Input(path))
        else:
            inputs.append(Input(path, "not found"))
    return inputs


class Predictor:
    """A checkpoint ready for inference: the model in eval mode on ``device`` (CUDA when
    available), its classes, and the input path its evaluation used."""

    def __init__(self, checkpoint: str | Path = paths.BEST, device: torch.device | None = None):
        self.device = device or pick_device()
        model, cfg, ckpt = load_checkpoint(Path(checkpoint), self.device)
        self.model = model.eval()
        self.model_name = cfg.model
        self.classes = list(ckpt["classes"])
        self.image_size = cfg.data.image_size
        takes_images = MODEL_INPUTS[cfg.model] == "images"
        self.tta = tta_views(cfg.eval.tta, cfg)  # as in evaluation
        self.normalize = Normalize(self.device)
        self.stem = None
        if not takes_images:
            # The features stage's frozen backbone, from the same spec: 'none' is a fixed-seed
            # init, 'imagenet' the hash-checked hub file. A weights *file* must be unchanged.
            self.stem = frozen_stem(build_resnet18(cfg.features.weights)).to(self.device)
            self.features_size = cfg.features.image_size

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N x 3 x S x S prepared pixels -> softmax probabilities N x classes (CPU)."""
        x = images.to(self.device)
        if self.stem is None:
            logits = infer(self.model, self.normalize(x), tta=self.tta)
        else:
            # The features stage's own function (fp16 activations, as stored), then the head
            # as evaluation feeds it; the round trip through the CPU is one small copy.
            features = precompute_features(
                self.stem,
                x,
                image_size=self.features_size,
                batch_size=len(x),
                device=self.device,
            )
            logits = infer(self.model, features.to(self.device).float())
        return logits.softmax(1).cpu()

    def predict(
        self,
        inputs: Sequence[Input],
        *,
        topk: int = DEFAULT_TOPK,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> Iterator[Prediction]:
        """One Prediction per input, in order; ``topk`` above the class count gives them all."""
        if topk < 1:
            raise ValueError(f"topk: must be >= 1, got {topk}")
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        k = min(topk, len(self.classes))
        for start in range(0, len(inputs), batch_size):
            chunk = inputs[start : start + batch_size]
            pixels, reasons = self._decode(chunk)
            tops = iter(())
            if pixels:
                batch = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2)
                probs, idx = self.probabilities(batch).topk(k, dim=1)
                tops = iter(zip(probs.tolist(), idx.tolist(), strict=True))
            for item, reason in zip(chunk, reasons, strict=True):
                if reason is not None:
                    yield Prediction(str(item.path), error=reason)
                    continue
                p, i = next(tops)
                top = [(self.classes[c], prob) for prob, c in zip(p, i, strict=True)]
                yield Prediction(str(item.path), top=top)

    def _decode(self, chunk: Sequence[Input]) -> tuple[list[np.ndarray], list[str | None]]:
        """HWC uint8 pixels of the files that decode; per file, None or why it failed."""
        pixels, reasons = [], []
        with strict_truncation():
            for item in chunk:
                reason = item.error
                if reason is None:
                    try:
                        pixels.append(decode_image(item.path, self.image_size)[0])
                    except BadImageError as exc:
                        reason = exc.reason
                    except OSError as exc:  # stat() of a file that vanished or is unreadable
                        reason = (exc.strerror or type(exc).__name__).lower()
                reasons.append(reason)
        return pixels, reasons


def predict(
    args: Iterable[str | Path],
    *,
    checkpoint: str | Path = paths.BEST,
    topk: int = DEFAULT_TOPK,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: torch.device | None = None,
) -> list[Prediction]:
    """Classify files and folders (see ``list_inputs``) with a checkpoint."""
    predictor = Predictor(checkpoint, device)
    return list(predictor.predict(list_inputs(args), topk=topk, batch_size=batch_size))


def format_table(predictions: Sequence[Prediction]) -> str:
    """Aligned columns: path, then ``class (prob)`` per rank; a failed file's row says why."""
    k = max((len(p.top) for p in predictions), default=0)
    header = ["path", *(f"top-{r}" for r in range(1, k + 1))]
    rows = [
        [p.path, f"error: {p.error}"]
        if p.error is not None
        else [p.path, *(f"{c} ({prob:.3f})" for c, prob in p.top)]
        for p in predictions
    ]
    # Error text spans the class columns: only the path column sizes by every row.
    sized = [header, *(r for r, p in zip(rows, predictions, strict=True) if p.error is None)]
    widths = [max(len(r[0]) for r in [header, *rows])]
    widths += [max(len(r[i]) for r in sized) for i in range(1, k + 1)]
    widths += [0] * (2 - len(widths))  # every row an error: the error column still shows
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)).rstrip()
        for row in [header, *rows]
    ]
    return "\n".join(lines)


def format_json(predictions: Sequence[Prediction]) -> str:
    return json.dumps([p.to_dict() for p in predictions], indent=2)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths", nargs="+", metavar="PATH", help="image files, or folders walked recursively"
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=paths.BEST,
        help=f"a train stage checkpoint (default: {paths.BEST})",
    )
    parser.add_argument(
        "--topk",
        type=_positive_int,
        default=DEFAULT_TOPK,
        help=f"classes shown per file, most probable first; more than the checkpoint has shows "
        f"them all (default: {DEFAULT_TOPK})",
    )
    parser.add_argument(
        "--json", action="store_true", help='a JSON list of {"path", "top"} or {"path", "error"}'
    )
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=DEFAULT_BATCH_SIZE,
        help=f"images decoded and classified at a time (default: {DEFAULT_BATCH_SIZE})",
    )


def run(args: argparse.Namespace) -> int:
    """The subcommand: print the predictions; 1 when any file failed, else 0."""
    predictor = Predictor(args.checkpoint)
    predictions = list(
        predictor.predict(list_inputs(args.paths), topk=args.topk, batch_size=args.batch_size)
    )
    print(format_json(predictions) if args.json else format_table(predictions))
    return 1 if any(p.error is not None for p in predictions) else 0
