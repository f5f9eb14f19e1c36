"""Compute-bound training img/s in fp32 and under CPU bf16 autocast (``train.amp_cpu``).

    python -m bench.bf16_isa [--models minivgg,simpleresnet] [--data data]

Run it as is and under an ISA cap to see what bf16 costs on a CPU without native bf16:

    ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 \\
        python -m bench.bf16_isa

The windows are bench.throughput's (its ``compute_bound``), short, because bf16 on AVX2
runs at tens of img/s.

Models with attention (vit_tiny) get a second row with scaled_dot_product_attention forced
onto its math kernel (``sdpa_kernel(SDPBackend.MATH)``) instead of PyTorch's choice (flash
attention on the CPU): which kernel is faster differs between fp32 and bf16.
"""

import argparse
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.throughput import compute_bound, recipe
from cvplay.config import TrainConfig
from cvplay.data import load_packed
from cvplay.engine import machine, pick_device
from cvplay.models import build_model
from cvplay.train import configure_compute


def setup(doc: str, models: str, argv=None):
    """The command line shared by the compute-bound benches (--models, --data, --batch-size,
    --steps): the parsed args, the device and the prepared training images; prints the
    machine (the ATen CPU capability and bf16 units)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--models", default=models)
    parser.add_argument("--data", default="data", help="a prepared data/ directory")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="one batch size for all (default: recipes)"
    )
    parser.add_argument("--steps", type=int, default=3, help="timed steps per window")
    args = parser.parse_args(argv)
    device = pick_device()
    configure_compute(TrainConfig(), device)
    packed = load_packed(Path(args.data) / "packed" / "train.pt")
    print(machine())
    return args, device, packed


def main(argv=None) -> None:
    args, device, packed = setup(__doc__, "minivgg,simpleresnet", argv)
    print("| model | fp32 img/s | bf16 img/s | bf16 / fp32 |\n|---|---|---|---|")
    for name in args.models.split(","):
        cfg = replace(recipe(name, args.batch_size), amp_cpu=False)
        bf16_cfg = replace(cfg, amp_cpu=True)
        kernels = {"": nullcontext}
        if has_attention(name):
            kernels[", math attention"] = lambda: sdpa_kernel(SDPBackend.MATH)
        for label, kernel in kernels.items():
            with kernel():
                fp32 = compute_bound(name, packed, cfg, device, 1, args.steps, 0.0)
                bf16 = compute_bound(name, packed, bf16_cfg, device, 1, args.steps, 0.0)
            print(f"| {name}{label} | {fp32:.1f} | {bf16:.1f} | {bf16 / fp32:.2f} |", flush=True)


def has_attention(name: str) -> bool:
    model = build_model(name, num_classes=10, model_args={"use_bn": True})
    return any(isinstance(m, nn.MultiheadAttention) for m in model.modules())


if __name__ == "__main__":
    main()
