"""Training throughput (images/s) of every scratch model, three ways, in one run.

    python -m bench.throughput [--models mlp,simplecnn] [--steps 20] [--json]

(a) compute bound: the model, optimizer and batch size stepping on one pre-made batch in a
    tight loop — what the hardware gives the model alone;
(b) pipeline: our default training path end to end — ``PackedLoader`` (device-resident
    uint8 data, crop/flip/normalise by indexing) feeding ``train_one_epoch``;
(c) notebook: ImageFolder on the PNG tree + torchvision transforms + DataLoader with
    num_workers=2 (``train.loader: folder``), feeding the same loop.

Then the compute bound again under each compute setting (channels_last, torch.compile,
batch 256, 1 thread), so defaults are chosen by measurement. Needs the prepared data
(``dvc repro prepare``, or ``--data`` pointing at another prepared ``data/``).
Writes the table to bench/RESULTS.md unless --no-write; --json prints the figures.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from cvplay.config import TrainConfig
from cvplay.data import Normalize, PackedLoader, folder_loader, load_packed
from cvplay.distributed import Dist
from cvplay.engine import make_optimizer, make_schedule, pick_device, set_seed, train_one_epoch
from cvplay.models import MODEL_INPUTS, MODELS, build_model
from cvplay.train import configure_compute, has_conv, prepare_model

SCRATCH = [m for m in ("mlp", "simplecnn", "simpleresnet", "minivgg") if m in MODELS]
RESULTS = Path(__file__).with_name("RESULTS.md")
REPEATS = 3


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


def _timed_steps(model, batches, cfg: TrainConfig, device, warmup: int, steps: int) -> float:
    """Median images/s of train_one_epoch over REPEATS windows of ``steps`` batches,
    after ``warmup`` batches (a single short window varies by +-20% on this machine)."""
    optimizer = make_optimizer(model, cfg)
    schedule = make_schedule(optimizer, replace(cfg, scheduler="none"), 1)
    criterion = nn.CrossEntropyLoss()
    it = iter(batches)
    common = {"device": device, "amp": cfg.amp}
    train_one_epoch(model, itertools.islice(it, warmup), optimizer, criterion, schedule, **common)
    rates = []
    for _ in range(REPEATS):
        _sync(device)
        start = time.perf_counter()
        train_one_epoch(
            model, itertools.islice(it, steps), optimizer, criterion, schedule, **common
        )
        _sync(device)
        rates.append(steps * cfg.batch_size / (time.perf_counter() - start))
    return statistics.median(rates)


def _forever(loader):
    while True:
        yield from loader


def compute_bound(name, packed, cfg, device, warmup, steps) -> float:
    model, channels_last = _model(name, device, cfg)
    x = Normalize(device)(packed.images[: cfg.batch_size].to(device))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = packed.labels[: cfg.batch_size].to(device)
    return _timed_steps(model, itertools.repeat((x, y)), cfg, device, warmup, steps)


def pipeline(name, packed, cfg, device, warmup, steps) -> float:
    model, channels_last = _model(name, device, cfg)
    loader = PackedLoader(
        packed,
        torch.arange(len(packed.labels)),
        batch_size=cfg.batch_size,
        device=device,
        train=True,
        seed=0,
        channels_last=channels_last,
    )
    return _timed_steps(model, _forever(loader), cfg, device, warmup, steps)


def notebook(name, data_dir, n, cfg, device, warmup, steps) -> float:
    loader = folder_loader(
        data_dir / "train",
        torch.arange(n),
        batch_size=cfg.batch_size,
        device=device,
        train=True,
        seed=0,
        num_workers=2,
    )
    model, _ = _model(name, device, cfg)
    return _timed_steps(model, _forever(loader), cfg, device, warmup, steps)


# Each compute setting against the defaults (params.yaml's train section).
VARIANTS = {
    "channels_last off (NCHW)": lambda c: replace(c, channels_last=not c.channels_last),
    "compile": lambda c: replace(c, compile=True),
    "batch 256": lambda c: replace(c, batch_size=256),
    "1 thread": lambda c: c,  # set around the call
}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {torch.get_num_threads()} torch threads, {dev}; "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )


def run(args) -> dict:
    device = pick_device()
    configure_compute(TrainConfig(), device)  # the training stage's own settings
    data_dir = Path(args.data)
    packed = load_packed(data_dir / "packed" / "train.pt")
    base = replace(TrainConfig(), batch_size=args.batch_size)
    results: dict[str, dict] = {}
    for name in args.models:
        w, s = args.warmup, args.steps
        row = {
            "compute_bound": compute_bound(name, packed, base, device, w, s),
            "pipeline": pipeline(name, packed, base, device, w, s),
            "notebook": notebook(name, data_dir, len(packed.labels), base, device, w, s),
        }
        if args.variants:
            row["variants"] = {}
            for label, change in VARIANTS.items():
                threads = torch.get_num_threads()
                if label == "1 thread":
                    torch.set_num_threads(1)
                try:
                    row["variants"][label] = compute_bound(
                        name, packed, change(base), device, w + (5 if "compile" in label else 0), s
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
        "| model | (a) compute bound img/s | (b) pipeline img/s | (c) notebook img/s | b/a | b/c |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        a, b, c = r["compute_bound"], r["pipeline"], r["notebook"]
        lines.append(f"| {name} | {a:.0f} | {b:.0f} | {c:.0f} | {b / a:.2f} | {b / c:.2f} |")
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
        "--models", default=",".join(SCRATCH), help=f"comma-separated, from: {', '.join(SCRATCH)}"
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=TrainConfig().batch_size)
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
        if m not in SCRATCH or MODEL_INPUTS[m] != "images":
            parser.error(f"unknown model {m!r}; choose from: {', '.join(SCRATCH)}")
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
            f"Batch size {args.batch_size}; each figure is the median of {REPEATS} windows of "
            f"{args.steps} steps after {args.warmup} warm-up steps.\n\n" + text + "\n"
        )


if __name__ == "__main__":
    main()
