"""Muon (Jordan et al., 2024: momentum orthogonalized by Newton-Schulz) for the hidden
weight matrices, with AdamW for everything else, as one optimizer so that every scheduler,
gradient clipping and checkpointing treat it like SGD or AdamW.

Each hidden matrix (a linear or attention projection weight, or a conv filter bank seen as
out x in*k*k) takes Nesterov momentum, whose update is replaced by the nearest
semi-orthogonal matrix (five quintic Newton-Schulz iterations, as in Keller Jordan's Muon
and ``torch.optim.Muon``), scaled by 0.2 x sqrt(max(rows, cols)) so that its RMS matches
a typical AdamW update (Liu et al., 2025, "Muon is scalable for LLM training";
``torch.optim.Muon``'s ``adjust_lr_fn="match_rms_adamw"``): the matrices and the AdamW
parameters share one learning rate and one decoupled weight decay. ``torch.optim.Muon``
itself takes 2-d parameters only, so it cannot hold conv filters or the AdamW ones.

The first and the last weight layer (the patch embedding or first conv, and the
classifier head) stay with AdamW, as in Muon's own recipe; so do 1-d parameters (biases,
norm layers) and embeddings (a ViT's class token and position embeddings).
"""

from __future__ import annotations

import math

import torch
from torch import nn

MUON_MOMENTUM = 0.95  # Muon's default (Keller Jordan's and torch.optim.Muon's)
NS_STEPS = 5
NS_COEFFS = (3.4445, -4.7750, 2.0315)  # the quintic's coefficients from Keller Jordan's Muon


def newton_schulz(g: torch.Tensor, steps: int = NS_STEPS, bf16: bool = False) -> torch.Tensor:
    """An approximation of U V^T for g = U S V^T (g 2-d): the singular values are pushed
    toward 1 (into roughly [0.7, 1.2]). In bf16 or fp32 (``newton_schulz_in_bf16`` says
    which for a device), returned in ``g``'s dtype."""
    a, b, c = NS_COEFFS
    x = g.bfloat16() if bf16 else g.float()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / (x.norm() + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return (x.T if tall else x).to(g.dtype)


def muon_params(model: nn.Module) -> set[int]:
    """ids of the parameters Muon trains: the weights of every nn.Linear and nn.Conv2d and
    every attention ``in_proj_weight`` except the first and the last in the model's
    parameter order (input layer and classifier head)."""
    hidden = []
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            hidden.append(module.weight)
        elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            hidden.append(module.in_proj_weight)
    wanted = {id(p) for p in hidden if p.requires_grad}
    ordered = [p for p in model.parameters() if id(p) in wanted]
    return {id(p) for p in ordered[1:-1]}


def newton_schulz_in_bf16(device: torch.device, bf16_cpu: bool) -> bool:
    """Whether Muon orthogonalizes in bf16 on ``device``: always on CUDA, as the reference
    does; on the CPU with ``bf16_cpu`` (``train.muon_bf16_cpu``: a CPU without native bf16
    runs bf16 matmuls 10x slower); never elsewhere."""
    return device.type == "cuda" or (bf16_cpu and device.type == "cpu")


class MuonAdamW(torch.optim.Optimizer):
    """Param groups with ``use_muon=True`` take Muon steps, the others AdamW steps (betas,
    eps as torch.optim.AdamW's defaults). ``lr`` and ``weight_decay`` (decoupled: each step
    multiplies the weights by 1 - lr x weight_decay) are per group, so schedulers that scale
    ``lr`` (and OneCycleLR's cycling of ``betas``) work as with AdamW. ``bf16_cpu``: the
    Newton-Schulz iterations of CPU parameters in bf16 too (CUDA ones always are): 2-3x
    faster on a CPU with AMX (``python -m bench.muon_bf16``), a different rounding from fp32's."""

    def __init__(
        self,
        groups: list[dict],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        momentum: float = MUON_MOMENTUM,
        bf16_cpu: bool = False,
    ):
        self.bf16_cpu = bf16_cpu
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "momentum": momentum,
            "weight_decay": 0.0,
            "use_muon": False,
        }
        super().__init__(groups, defaults)
        for g in self.param_groups:
            if g["use_muon"] and any(p.ndim < 2 for p in g["params"]):
                raise ValueError("Muon groups hold matrices (2-d or conv 4-d) only")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            lr, wd = g["lr"], g["weight_decay"]
            params = [p for p in g["params"] if p.grad is not None]
            if not params:
                continue
            if g["use_muon"]:
                self._muon(params, lr, wd, g["momentum"])
            else:
                self._adamw(params, lr, wd, g["betas"], g["eps"])
        return loss

    def _muon(self, params, lr, wd, momentum):
        for p in params:
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - momentum)
            update = p.grad.lerp(buf, momentum)  # Nesterov
            rows = p.size(0)
            cols = p[0].numel()
            bf16 = newton_schulz_in_bf16(p.device, self.bf16_cpu)
            ortho = newton_schulz(update.reshape(rows, cols), bf16=bf16).view_as(p)
            p.mul_(1 - lr * wd)
            p.add_(ortho, alpha=-lr * 0.2 * math.sqrt(max(rows, cols)))

    def _adamw(self, params, lr, wd, betas, eps):
        beta1, beta2 = betas
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t = state["step"]
            m, v = state["exp_avg"], state["exp_avg_sq"]
            m.lerp_(p.grad, 1 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)  # as torch.optim.AdamW
            p.mul_(1 - lr * wd)
            p.addcdiv_(m, denom, value=-lr / (1 - beta1**t))
