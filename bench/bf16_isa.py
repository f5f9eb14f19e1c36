"""Compute-bound training img/s in fp32 and under CPU bf16 autocast (``train.amp_cpu``).

    python -m bench.bf16_isa [--models minivgg,simpleresnet] [--data data]

Run it as is and under an ISA cap to see what bf16 costs on a CPU without native bf16:

    ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 \\
        python -m bench.bf16_isa

The windows are bench.throughput's (its ``compute_bound``), short, because bf16 on AVX2
runs at tens of img/s.
"""

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from bench.throughput import compute_bound, recipe
from cvplay.config import TrainConfig
from cvplay.data import load_packed
from cvplay.engine import machine, pick_device
from cvplay.train import configure_compute


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minivgg,simpleresnet")
    parser.add_argument("--data", default="data", help="a prepared data/ directory")
    args = parser.parse_args(argv)
    device = pick_device()
    configure_compute(TrainConfig(), device)
    packed = load_packed(Path(args.data) / "packed" / "train.pt")
    print(f"{machine()}; ATen CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print("| model | fp32 img/s | bf16 img/s | bf16 / fp32 |\n|---|---|---|---|")
    for name in args.models.split(","):
        cfg = replace(recipe(name, None), amp_cpu=False)
        fp32 = compute_bound(name, packed, cfg, device, 1, 3, 0.0)
        bf16 = compute_bound(name, packed, replace(cfg, amp_cpu=True), device, 1, 3, 0.0)
        print(f"| {name} | {fp32:.0f} | {bf16:.0f} | {bf16 / fp32:.2f} |", flush=True)


if __name__ == "__main__":
    main()
