"""What ``train.muon_bf16_cpu`` buys: Muon's Newton-Schulz iterations in fp32 against bf16.

    python -m bench.muon_bf16 [--models simpleresnet,resnet9,preactresnet18] [--data data]

Per model (its recipe from params.yaml, with optimizer muon whatever the recipe says): the
Newton-Schulz time of one optimizer step over the model's Muon matrices (random gradients of
their shapes, ms), and the compute-bound training img/s under bf16 autocast
(``train.amp_cpu``) with the iterations in fp32 and in bf16 (bench.throughput's
``compute_bound``: one pre-made batch, the whole step: forward, backward, optimizer).
"""

import time
from dataclasses import replace

import torch

from bench.bf16_isa import setup
from bench.throughput import compute_bound, recipe
from cvplay.models import build_model
from cvplay.optim import muon_params, newton_schulz


def newton_schulz_ms(name: str, bf16: bool, repeats: int) -> tuple[int, float]:
    """The number of ``name``'s Muon matrices and the mean ms of one pass over all of them."""
    model = build_model(name, num_classes=10, model_args={"use_bn": True})
    ids = muon_params(model)
    gen = torch.Generator().manual_seed(0)
    grads = [
        torch.randn(p.size(0), p[0].numel(), generator=gen)
        for p in model.parameters()
        if id(p) in ids
    ]
    for g in grads:  # warm-up: the first call of each shape picks its kernels
        newton_schulz(g, bf16=bf16)
    start = time.perf_counter()
    for _ in range(repeats):
        for g in grads:
            newton_schulz(g, bf16=bf16)
    return len(grads), (time.perf_counter() - start) / repeats * 1000


def main(argv=None) -> None:
    args, device, packed = setup(__doc__, "simpleresnet,resnet9,preactresnet18", argv)
    print(
        "| model | batch | Muon matrices | NS fp32 ms/step | NS bf16 ms/step | "
        "fp32 NS img/s | bf16 NS img/s | bf16 / fp32 |\n|---|---|---|---|---|---|---|---|"
    )
    for name in args.models.split(","):
        cfg = replace(recipe(name, args.batch_size), optimizer="muon", amp_cpu=True)
        n, fp32_ms = newton_schulz_ms(name, False, args.steps)
        _, bf16_ms = newton_schulz_ms(name, True, args.steps)
        rates = [
            compute_bound(name, packed, replace(cfg, muon_bf16_cpu=on), device, 1, args.steps, 0.0)
            for on in (False, True)
        ]
        print(
            f"| {name} | {cfg.batch_size} | {n} | {fp32_ms:.0f} | {bf16_ms:.0f} | "
            f"{rates[0]:.1f} | {rates[1]:.1f} | {rates[1] / rates[0]:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
