"""Record the workspace's last run in bench/ACCURACY.md (one row per model, replaced in place).

    dvc exp run -S model=mlp -S data.source=../shared/data/cifar10-jpg
    python -m bench.accuracy --command "dvc exp run -S model=mlp -S data.source=..."

Reads params.yaml (the resolved recipe), metrics/train.json, metrics/eval.json and
logs/train_timing.json as the pipeline wrote them; prints the row, and with --write stores
it. Nothing here trains: the figures are whatever the run measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import re
import sys
from pathlib import Path

from cvplay import paths
from cvplay.config import (
    CROP_AUGMENTS,
    WARMUP_SCHEDULERS,
    ModelArgs,
    TrainConfig,
    load_params,
)
from cvplay.engine import machine, tta_views

ACCURACY = Path(__file__).with_name("ACCURACY.md")
HEADER = (
    "| model | val acc (best) | test acc | epochs | params | fwd MFLOPs/img | train time | "
    "recipe | date | command |\n|---|---|---|---|---|---|---|---|---|---|"
)
BEGIN, END = "<!-- rows -->", "<!-- /rows -->"


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s"


def model_args(args: ModelArgs) -> str:
    """The ``model_args`` keys set away from their defaults, as params.yaml spells them."""
    return "".join(
        f" {f.name} {str(value).lower() if isinstance(value, bool) else value}"
        for f in dataclasses.fields(args)
        if (value := getattr(args, f.name)) != f.default
    )


def row(command: str) -> tuple[str, str]:
    params = load_params()
    train = json.loads(Path(paths.METRICS_TRAIN).read_text())
    evaluation = json.loads(Path(paths.METRICS_EVAL).read_text())
    timing = json.loads(Path(paths.TIMING_TRAIN).read_text())
    t = params.train
    tta = tta_views(params.eval.tta, params)
    default = TrainConfig()
    crop = t.augment in CROP_AUGMENTS
    recipe = (
        f"{t.optimizer} lr {t.lr:g} wd {t.weight_decay:g}"
        + (
            f" momentum {t.momentum:g}"
            if t.optimizer == "sgd" and t.momentum != default.momentum
            else ""
        )
        + (
            f" momentum {t.muon_momentum:g}"
            if t.optimizer == "muon" and t.muon_momentum != default.muon_momentum
            else ""
        )
        + (" wd on norm/bias" if t.decay_norm_bias else "")
        + (f" norm lr x{t.norm_lr_scale:g}" if t.norm_lr_scale != 1 else "")
        + f" {t.scheduler}"
        + (
            f" warm-up {t.warmup_epochs:g} ep"
            if t.scheduler in WARMUP_SCHEDULERS and t.warmup_epochs
            else ""
        )
        + f" bs {t.batch_size} ls {t.label_smoothing:g} ema {t.ema:g}"
        + (f" lookahead {t.lookahead:g}" if t.lookahead else "")
        + f" aug {t.augment}"
        + (f" pad {t.crop_padding}" if crop else "")
        + (f" {t.crop_pad_mode}" if crop and t.crop_pad_mode != "zeros" else "")
        + (f" cutout {t.cutout}" if t.cutout else "")
        + model_args(params.model_args)
        + (f" tta {tta}" if tta != "none" else "")
        # what the run did on its device (train.amp on CUDA, train.amp_cpu on the CPU)
        + (" bf16 autocast" if timing.get("autocast") == "bf16" else "")
        + (" muon NS bf16" if timing.get("newton_schulz") == "bf16" else "")
    )
    mflops = train.get("forward_mflops")
    cells = [
        params.model,
        f"{train['val_acc']:.4f}",
        f"{evaluation['test_acc']:.4f}",
        str(t.epochs),
        f"{train['params']:,}",
        f"{mflops:.1f}" if mflops is not None else "—",
        minutes(timing["train_seconds"]),
        recipe,
        datetime.date.today().isoformat(),
        f"`{command}`" if command else "—",
    ]
    return params.model, "| " + " | ".join(cells) + " |"


def upsert(text: str, model: str, line: str) -> str:
    if BEGIN not in text:
        text = (
            "# Accuracy\n\nBest validation accuracy (45000/5000 split, seed 42) and test "
            "accuracy per model, as measured by the pipeline. Record a run with "
            "`python -m bench.accuracy --write --command '...'`.\n\n"
            f"Machine: {machine()}\n\n{HEADER}\n{BEGIN}\n{END}\n"
        )
    head, rest = text.split(BEGIN, 1)
    body, tail = rest.split(END, 1)
    rows = [r for r in body.strip().splitlines() if r and not re.match(rf"\| {model} \|", r)]
    rows.append(line)
    return f"{head}{BEGIN}\n" + "\n".join(rows) + f"\n{END}{tail}"


def store(model: str, line: str) -> None:
    """Put ``line`` in ACCURACY.md as ``model``'s row."""
    text = ACCURACY.read_text() if ACCURACY.exists() else ""
    ACCURACY.write_text(upsert(text, model, line))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--command", default="", help="the command that produced the run")
    parser.add_argument("--write", action="store_true", help=f"store the row in {ACCURACY.name}")
    args = parser.parse_args(argv)
    try:
        model, line = row(args.command)
    except FileNotFoundError as exc:
        sys.exit(f"error: {exc.filename}: not found; run the pipeline first")
    print(line)
    if args.write:
        store(model, line)


if __name__ == "__main__":
    main()
