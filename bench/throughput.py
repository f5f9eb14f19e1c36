"""Training throughput (images/s) of every scratch model, three ways, in one run.

    python -m bench.throughput [--models mlp,simplecnn] [--steps 20] [--json]

Each model trains with its own recipe from params.yaml (``models.<name>``: batch size,
optimizer, label smoothing, EMA, gradient clipping) and the train section's compute
settings, exactly as ``dvc exp run -S model=<name>`` would:

(a) compute bound: the model, optimizer and batch size stepping on one pre-made batch in a
    tight loop — what the hardware gives the model alone;
(b) pipeline: our default training path end to end — ``PackedLoader`` (device-resident
    uint8 data, crop/flip/normalise by indexing) feeding ``train_one_epoch``;
(c) notebook: ImageFolder on the PNG tree + torchvision transforms + DataLoader with
    num_workers=2, feeding the same loop, as the notebook trained every model (crop + flip
    transforms, NCHW eager model);
(c') the same loader with the recipe's augmentation and our compute settings
    (``train.loader: folder``): b/c' is what the data path alone is worth.

Then the compute bound again under each compute setting (channels_last, torch.compile,
2x batch, 1 thread, optimizer not fused), so defaults are chosen by measurement. Needs the
prepared data (``dvc repro prepare``, or ``--data`` pointing at another prepared ``data/``).
Writes the table to bench/RESULTS.md unless --no-write; --json prints the figures.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import yaml
from torch import nn

from cvplay.config import TrainConfig, parse_params
from cvplay.data import Normalize, load_packed
from cvplay.distributed import Dist
from cvplay.engine import (
    EMA,
    amp_enabled,
    machine,
    make_optimizer,
    make_schedule,
    pick_device,
    set_seed,
    train_one_epoch,
)
from cvplay.loaders import PackedLoader, folder_loader
from cvplay.models import MODEL_INPUTS, MODELS, build_model
from cvplay.train import configure_compute, has_conv, prepare_model

# The notebook's scratch models by default; --models takes any model trained from images.
SCRATCH = ["mlp", "simplecnn", "simpleresnet", "minivgg"]
IMAGE_MODELS = sorted(m for m in MODELS if MODEL_INPUTS[m] == "images")
RESULTS = Path(__file__).with_name("RESULTS.md")
REPEATS = 3
PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model(name: str, device: torch.device, cfg: TrainConfig) -> tuple[nn.Module, bool]:
    """The model as the train stage prepares it, and whether it runs channels_last."""
    set_seed(0)
    model = build_model(name, num_classes=10, model_args={"use_bn": True})
    channels_last = cfg.channels_last and has_conv(model)
    model = prepare_model(model, cfg, device, Dist(), channels_last)
    return model, channels_last


class Runner:
    """A model, its optimizer and a batch source, timed in windows of ``steps`` batches."""

    def __init__(self, model, batches, cfg: TrainConfig, device, fused: bool = True):
        self.model, self.batches, self.cfg, self.device = model, iter(batches), cfg, device
        self.optimizer = make_optimizer(model, cfg, fused=fused)
        self.schedule = make_schedule(self.optimizer, replace(cfg, scheduler="none"), 1)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.ema = EMA(model, cfg.ema) if cfg.ema > 0 else None
        self.steps = 0  # timed steps per window, set by measure()

    def run(self, steps: int) -> None:
        train_one_epoch(
            self.model,
            itertools.islice(self.batches, steps),
            self.optimizer,
            self.criterion,
            self.schedule,
            device=self.device,
            amp=amp_enabled(self.cfg, self.device),
            ema=self.ema,
            grad_clip=self.cfg.grad_clip,
        )

    def window(self, steps: int) -> float:
        """Images/s of one window of ``steps`` batches."""
        _sync(self.device)
        start = time.perf_counter()
        self.run(steps)
        _sync(self.device)
        return steps * self.cfg.batch_size / (time.perf_counter() - start)


def measure(runners: list[Runner], warmup: int, steps: int, min_seconds: float) -> list[float]:
    """Median images/s of each runner over REPEATS windows, the runners' windows interleaved
    (a, b, a, b, ...) so that drift in the machine's speed (+-15% over a minute here)
    falls on all of them alike instead of biasing their ratio.

    A window is ``steps`` steps, or more where that would take under ``min_seconds`` (fast
    models: a 0.3 s window of the mlp is mostly timer and scheduler noise)."""
    for r in runners:
        r.run(warmup)
        start = time.perf_counter()
        r.run(warmup)
        per_step = (time.perf_counter() - start) / warmup
        r.steps = max(steps, math.ceil(min_seconds / per_step))
    rates: list[list[float]] = [[] for _ in runners]
    for _ in range(REPEATS):
        for r, out in zip(runners, rates, strict=True):
            out.append(r.window(r.steps))
    return [statistics.median(r) for r in rates]


def _forever(loader):
    while True:
        yield from loader


def compute_bound_runner(name, packed, cfg, device, fused: bool = True) -> Runner:
    model, channels_last = _model(name, device, cfg)
    x = Normalize(device)(packed.images[: cfg.batch_size].to(device))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = packed.labels[: cfg.batch_size].to(device)
    return Runner(model, itertools.repeat((x, y)), cfg, device, fused)


def pipeline_runner(name, packed, cfg, device) -> Runner:
    model, channels_last = _model(name, device, cfg)
    loader = PackedLoader(
        packed,
        torch.arange(len(packed.labels)),
        batch_size=cfg.batch_size,
        device=device,
        train=True,
        seed=0,
        channels_last=channels_last,
        augment=cfg.augment,
        crop_padding=cfg.crop_padding,
        crop_pad_mode=cfg.crop_pad_mode,
    )
    return Runner(model, _forever(loader), cfg, device)


# What the notebook did for every model (../shared/docs/MISSION.md): RandomCrop(32,
# padding=4) + RandomHorizontalFlip + ToTensor + Normalize, a plain NCHW eager model.
NOTEBOOK = {
    "augment": "crop_flip",
    "crop_padding": 4,
    "crop_pad_mode": "zeros",
    "channels_last": False,
    "compile": False,
}


def notebook_runner(name, data_dir, n, cfg, device, as_notebook: bool) -> Runner:
    """The notebook's loader (ImageFolder + transforms, 2 workers) with the recipe's batch size
    and optimizer; ``as_notebook`` also takes the notebook's transforms and compute settings,
    else the recipe's (what ``train.loader: folder`` runs)."""
    if as_notebook:
        cfg = replace(cfg, **NOTEBOOK)
    loader = folder_loader(
        data_dir / "train",
        torch.arange(n),
        batch_size=cfg.batch_size,
        device=device,
        train=True,
        seed=0,
        num_workers=2,
        augment=cfg.augment,
        crop_padding=cfg.crop_padding,
        crop_pad_mode=cfg.crop_pad_mode,
    )
    model, _ = _model(name, device, cfg)
    return Runner(model, _forever(loader), cfg, device)


def compute_bound(name, packed, cfg, device, warmup, steps, min_seconds, fused=True) -> float:
    runner = compute_bound_runner(name, packed, cfg, device, fused)
    return measure([runner], warmup, steps, min_seconds)[0]


def recipe(name: str, batch_size: int | None) -> TrainConfig:
    """``name``'s training config as ``dvc exp run -S model=<name>`` resolves it."""
    raw = yaml.safe_load(PARAMS.read_text())
    train = parse_params({**raw, "model": name}).train
    return train if batch_size is None else replace(train, batch_size=batch_size)


# Each compute setting against the defaults (the model's recipe, params.yaml's train section).
VARIANTS = {
    "channels_last off (NCHW)": lambda c: replace(c, channels_last=not c.channels_last),
    "compile": lambda c: replace(c, compile=True),
    # train.amp on CUDA, train.amp_cpu on the CPU: whichever applies, switched
    "bf16 autocast toggled": lambda c: replace(c, amp=not c.amp, amp_cpu=not c.amp_cpu),
    "2x batch": lambda c: replace(c, batch_size=2 * c.batch_size),
    "1 thread": lambda c: c,  # set around the call
    "optimizer not fused": lambda c: c,  # passed to the runner
}


def run(args) -> dict:
    device = pick_device()
    configure_compute(TrainConfig(), device)  # the training stage's own settings
    data_dir = Path(args.data)
    packed = load_packed(data_dir / "packed" / "train.pt")
    n = len(packed.labels)
    results: dict[str, dict] = {}
    for name in args.models:
        cfg = recipe(name, args.batch_size)
        w, s, t = args.warmup, args.steps, args.min_seconds
        # (a) and (b) interleaved; (c) and (c') each alone, after them: DataLoader workers
        # would prefetch batches during the others' windows and start each window ahead.
        runners = [
            compute_bound_runner(name, packed, cfg, device),
            pipeline_runner(name, packed, cfg, device),
        ]
        a, b = measure(runners, w, s, t)
        row = {"compute_bound": a, "pipeline": b}
        for key, as_notebook in (("notebook", True), ("folder_loader", False)):
            nb = notebook_runner(name, data_dir, n, cfg, device, as_notebook)
            row[key] = measure([nb], w, s, t)[0]
            del nb  # its workers exit before the next measurement
        row["batch_size"], row["window_steps"] = cfg.batch_size, runners[0].steps
        if args.variants:
            row["variants"] = {}
            for label, change in VARIANTS.items():
                threads = torch.get_num_threads()
                if label == "1 thread":
                    torch.set_num_threads(1)
                try:
                    warm = w + (5 if "compile" in label else 0)
                    fused = label != "optimizer not fused"
                    row["variants"][label] = compute_bound(
                        name, packed, change(cfg), device, warm, s, t, fused
                    )
                finally:
                    torch.set_num_threads(threads)
        results[name] = row
        print(
            f"{name}: " + ", ".join(f"{k} {v:.0f}" for k, v in row.items() if k != "variants"),
            file=sys.stderr,
            flush=True,
        )
    return results


def table(results: dict) -> str:
    lines = [
        "| model | batch | (a) compute bound img/s | (b) pipeline img/s | (c) notebook img/s "
        "| b/a | b/c | (c') train.loader=folder img/s | b/c' |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        a, b, c = r["compute_bound"], r["pipeline"], r["notebook"]
        c2 = r["folder_loader"]
        lines.append(
            f"| {name} | {r['batch_size']} | {a:.0f} | {b:.0f} | {c:.0f} | {b / a:.2f} "
            f"| {b / c:.2f} | {c2:.0f} | {b / c2:.2f} |"
        )
    if any("variants" in r for r in results.values()):
        labels = list(VARIANTS)
        lines += [
            "",
            "Compute bound (a) under each setting, img/s (ratio to the default in brackets):",
            "",
            "| model | default | " + " | ".join(labels) + " |",
            "|---|---|" + "---|" * len(labels),
        ]
        for name, r in results.items():
            a = r["compute_bound"]
            cells = [f"{r['variants'][k]:.0f} ({r['variants'][k] / a:.2f})" for k in labels]
            lines.append(f"| {name} | {a:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        default=",".join(SCRATCH),
        help=f"comma-separated, from: {', '.join(IMAGE_MODELS)}",
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per window (at least)")
    parser.add_argument(
        "--min-seconds",
        type=float,
        default=2.0,
        help="more steps per window where --steps would take less than this",
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="one batch size for all (default: recipes)"
    )
    parser.add_argument("--data", default="data", help="a prepared data/ directory")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument(
        "--no-variants",
        dest="variants",
        action="store_false",
        help="skip the compute-setting comparison",
    )
    parser.add_argument(
        "--no-write", dest="write", action="store_false", help=f"do not write {RESULTS.name}"
    )
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in args.models:
        if m not in IMAGE_MODELS:
            parser.error(f"unknown model {m!r}; choose from: {', '.join(IMAGE_MODELS)}")
    if not (Path(args.data) / "packed" / "train.pt").exists():
        parser.error(f"{args.data}/packed/train.pt not found; run 'dvc repro prepare' first")
    results = run(args)
    text = table(results)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(text)
    if args.write:
        cmd = "python -m bench.throughput " + " ".join(sys.argv[1:] if argv is None else argv)
        RESULTS.write_text(
            "# Training throughput\n\n"
            f"Command: `{cmd.strip()}`  \n"
            f"Date: {datetime.date.today().isoformat()}  \n"
            f"Machine: {machine()}  \n"
            "Each model trains with its params.yaml recipe (batch size, optimizer, label "
            "smoothing, EMA, augmentation) and the train section's compute settings. (c) is "
            "the notebook: ImageFolder on the PNG tree, RandomCrop(32, padding=4) + flip + "
            "ToTensor + Normalize, DataLoader with 2 workers, NCHW eager model; (c') is that "
            "loader with the recipe's augmentation and our compute settings (`train.loader: "
            "folder`), so b/c' is the data path alone. "
            f"Each figure is the median of {REPEATS} windows of at least {args.steps} steps and "
            f"{args.min_seconds:g} s, after {args.warmup} warm-up steps; the windows of (a) and "
            "(b) alternate, so that drift in the machine's speed affects both alike.\n\n"
            + text
            + "\n"
        )


if __name__ == "__main__":
    main()
