"""Training and evaluation loops.

The loops never call ``.item()`` per batch: loss sums and correct counts stay on the device
and are read once per epoch (a host sync per batch stalls a GPU and costs on CPU too).
Losses and accuracies are averaged over samples, not over batch means.
"""

from __future__ import annotations

import contextlib
import copy
import math
import platform
import random
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from cvplay.config import Params, TrainConfig
from cvplay.distributed import reduce_sum
from cvplay.io import save_torch
from cvplay.models import MODEL_INPUTS
from cvplay.optim import MuonAdamW, muon_params
from cvplay.resume import ResumeStore, rng_state, set_rng_state


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def pick_device(local_rank: int = 0) -> torch.device:
    """CUDA (this process's GPU under torchrun) when available, else the CPU."""
    return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")


def machine() -> str:
    """The CPU model, torch threads and GPU, e.g. for a run's timing log: wall times are only
    comparable on the same machine, and the CPU behind a cloud VM can change between runs."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    # The model name alone does not tell an AVX2-only AMD EPYC from one with AVX-512 and
    # bf16 units, whose training speed differs 1.6x in fp32 and far more in bf16.
    bf16 = "+".join(cpu_bf16_units()) or "none"
    cpu = f"{cpu} ({torch.backends.cpu.get_cpu_capability()}, bf16 units: {bf16})"
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {torch.get_num_threads()} torch threads, {dev}; "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )


def accuracy_top1(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Fraction of samples whose arg-max logit is the target (a 0-d tensor, no host sync)."""
    return (logits.argmax(dim=1) == targets).float().mean()


NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def param_groups(
    model: nn.Module, weight_decay: float, decay_norm_bias: bool, norm_lr_scale: float = 1.0
) -> list[dict]:
    """Trainable parameters, with weight decay only on conv/linear weights unless
    ``decay_norm_bias`` (1-d tensors are biases and norm-layer scales/shifts; decaying them
    only fights BatchNorm's scale invariance). Attention ``in_proj_weight`` is 2-d: decayed.

    ``norm_lr_scale`` != 1 puts the norm layers' parameters in a group of their own whose
    learning rate is the optimizer's times this (airbench trains BatchNorm shifts 64x faster)
    and whose weight decay, if any, is divided by it: the gradient steps grow, the decay per
    step (lr x weight_decay) stays. Every scheduler scales each group's rate alike."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = []
    if norm_lr_scale != 1.0:
        in_norm = {
            id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters()
        }
        norm = [p for _, p in params if id(p) in in_norm]
        params = [(n, p) for n, p in params if id(p) not in in_norm]
        groups.append(
            {
                "params": norm,
                "weight_decay": weight_decay / norm_lr_scale if decay_norm_bias else 0.0,
                "lr_scale": norm_lr_scale,
            }
        )
    if decay_norm_bias:
        return [{"params": [p for _, p in params], "weight_decay": weight_decay}, *groups]

    def decays(name: str, p: torch.Tensor) -> bool:
        # ViT's class token and position embeddings are embeddings, not weights: no decay.
        return p.ndim > 1 and name.rsplit(".", 1)[-1] not in ("cls", "pos")

    return [
        {"params": [p for n, p in params if decays(n, p)], "weight_decay": weight_decay},
        {"params": [p for n, p in params if not decays(n, p)], "weight_decay": 0.0},
        *groups,
    ]


def make_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool = True) -> torch.optim.Optimizer:
    """SGD or AdamW, fused (one kernel over all parameters) on CPU and CUDA: measured on the
    2-core CPU, the mlp's SGD step takes 0.6 ms fused against 2.4 ms with foreach, 6% of
    its whole training step (bench/RESULTS.md). ``fused=False``: PyTorch's default.
    ``muon``: Muon for the hidden weight matrices, AdamW for the rest (cvplay.optim), each
    of ``param_groups``' groups split in two."""
    groups = param_groups(model, cfg.weight_decay, cfg.decay_norm_bias, cfg.norm_lr_scale)
    for g in groups:
        g["lr"] = cfg.lr * g.pop("lr_scale", 1.0)
    device = next(model.parameters()).device
    fused = True if fused and device.type in ("cpu", "cuda") else None
    if cfg.optimizer == "sgd":
        nesterov = cfg.nesterov and cfg.momentum > 0
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=nesterov, fused=fused
        )
    if cfg.optimizer == "muon":
        matrices = muon_params(unwrap(model))
        split = []
        for g in groups:
            for use_muon in (True, False):
                ps = [p for p in g["params"] if (id(p) in matrices) == use_muon]
                if ps:
                    split.append({**g, "params": ps, "use_muon": use_muon})
        return MuonAdamW(split, lr=cfg.lr, momentum=cfg.muon_momentum, bf16_cpu=cfg.muon_bf16_cpu)
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused)


@dataclass
class Schedule:
    """The LR scheduler and when it steps: per batch (onecycle) or per epoch on val loss."""

    scheduler: Any = None
    per_batch: bool = False

    def after_batch(self) -> None:
        if self.per_batch:
            self.scheduler.step()

    def after_epoch(self, val_loss: float) -> None:
        if self.scheduler is not None and not self.per_batch:
            self.scheduler.step(val_loss)


def make_schedule(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
) -> Schedule:
    if cfg.scheduler == "plateau":
        return Schedule(
            torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience
            )
        )
    if cfg.scheduler == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[g["lr"] for g in optimizer.param_groups],
            total_steps=cfg.epochs * steps_per_epoch,
            pct_start=cfg.warmup() / cfg.epochs,
        )
        return Schedule(sched, per_batch=True)
    if cfg.scheduler in ("cosine", "triangle"):
        total = cfg.epochs * steps_per_epoch
        warm = round(cfg.warmup() * steps_per_epoch)
        shape = _warmup_cosine if cfg.scheduler == "cosine" else _triangle
        return Schedule(
            torch.optim.lr_scheduler.LambdaLR(optimizer, partial(shape, warm, total)),
            per_batch=True,
        )
    return Schedule()


def _warmup_cosine(warm: int, total: int, step: int) -> float:
    """LR factor: linear from 1/warm to 1 over ``warm`` steps, then cosine down to 0."""
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


TRIANGLE_START = 0.2  # airbench's: the first step runs at 0.2 x the peak rate


def _triangle(warm: int, total: int, step: int) -> float:
    """LR factor (airbench's schedule): linear from TRIANGLE_START to 1 over ``warm`` steps,
    then linear down to 0 at step ``total``."""
    if step < warm:
        return TRIANGLE_START + (1.0 - TRIANGLE_START) * step / warm
    return max(0.0, (total - step) / max(1, total - warm))


class EMA:
    """Exponential moving average of a model's weights and buffers, updated after every
    optimizer step with no host sync: ``torch._foreach_lerp_`` over all float tensors.

    The decay ramps up as min(decay, (1 + t) / (10 + t)) so that the average is not
    dominated by the random initialisation early on. ``module`` is a plain copy of the model
    (outside DDP/compile) used for validation and saved as the checkpoint.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)
        self.decay = decay
        self.steps = 0
        src = unwrap(model)
        pairs = list(zip(self.module.state_dict().values(), src.state_dict().values(), strict=True))
        self.floats = [(e, m) for e, m in pairs if e.dtype.is_floating_point]
        self.others = [(e, m) for e, m in pairs if not e.dtype.is_floating_point]

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        ema, live = zip(*self.floats, strict=True)
        torch._foreach_lerp_(list(ema), list(live), 1.0 - decay)
        for e, m in self.others:  # e.g. BatchNorm's num_batches_tracked
            e.copy_(m)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.steps = state["steps"]


LOOKAHEAD_EVERY = 5  # airbench's: the slow weights are synced every 5 optimizer steps


class Lookahead:
    """airbench's lookahead: a slow copy of the model's float weights and buffers. Every
    ``LOOKAHEAD_EVERY`` optimizer steps the slow copy moves toward the live weights,
    slow += (1 - a) (live - slow) with a = decay^LOOKAHEAD_EVERY x (step / total_steps)^3,
    and the live weights are reset to it: no averaging while they still travel far, more as
    training ends. ``finish`` (after the last step) leaves the live weights at the slow ones.
    All of it is ``torch._foreach`` work on the device, with no host sync.
    """

    def __init__(self, model: nn.Module, decay: float, total_steps: int):
        self.decay, self.total_steps, self.steps = decay, total_steps, 0
        state = unwrap(model).state_dict()  # detached views of the live tensors
        self.live = [t for t in state.values() if t.dtype.is_floating_point]
        self.slow = [t.detach().clone() for t in self.live]

    @torch.no_grad()
    def _sync(self, alpha: float) -> None:
        torch._foreach_lerp_(self.slow, self.live, 1.0 - alpha)
        torch._foreach_copy_(self.live, self.slow)

    def update(self) -> None:
        self.steps += 1
        if self.steps % LOOKAHEAD_EVERY == 0:
            ramp = (self.steps / self.total_steps) ** 3
            self._sync(self.decay**LOOKAHEAD_EVERY * ramp)

    def finish(self) -> None:
        self._sync(1.0)

    def state_dict(self) -> dict[str, Any]:
        return {"slow": self.slow, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch._foreach_copy_(self.slow, list(state["slow"]))
        self.steps = state["steps"]


def amp_enabled(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether training on ``device`` runs under bf16 autocast: ``train.amp`` on CUDA,
    ``train.amp_cpu`` on the CPU, never elsewhere."""
    return {"cuda": cfg.amp, "cpu": cfg.amp_cpu}.get(device.type, False)


def cpu_bf16_units() -> list[str]:
    """The CPU's bf16 instructions oneDNN's bf16 kernels use, of ``AMX`` (tiles) and
    ``AVX512-BF16`` (torch.cpu's probes, private in the pinned torch)."""
    probes = {
        "AMX": torch.cpu._is_amx_tile_supported,
        "AVX512-BF16": torch.cpu._is_avx512_bf16_supported,
    }
    return [name for name, probe in probes.items() if probe()]


def cpu_runs_bf16_natively() -> bool:
    """AMX tiles or AVX512-BF16: what oneDNN's bf16 kernels need to beat fp32."""
    return bool(cpu_bf16_units())


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on ``device`` (CUDA or the CPU) when ``amp``; a no-op otherwise."""
    if device.type not in ("cuda", "cpu"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)


def _epoch_stats(sums: torch.Tensor, seen: int) -> dict[str, float]:
    # sums = [loss sum, correct] on the device; reduced over ranks with the sample count.
    # .tolist() syncs the device: once per epoch, not per batch.
    totals = torch.cat([sums, torch.tensor([float(seen)], dtype=sums.dtype, device=sums.device)])
    loss_sum, correct, n = reduce_sum(totals).tolist()
    n = max(n, 1.0)
    return {"loss": loss_sum / n, "acc": correct / n}


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    schedule: Schedule,
    *,
    device: torch.device,
    amp: bool = False,
    desc: str = "train",
    ema: EMA | None = None,
    lookahead: Lookahead | None = None,
    grad_clip: float = 0.0,
) -> dict[str, float]:
    model.train()
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    seen = 0
    # tqdm draws only on a terminal (disable=None); logs get one line per epoch from fit.
    bar = tqdm(loader, desc=desc, leave=False, disable=None, dynamic_ncols=True)
    for i, (x, y) in enumerate(bar):
        with autocast(device, amp):
            logits = model(x)
            loss = criterion(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            # foreach norm on the device; no host sync unless error_if_nonfinite
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=True)
        optimizer.step()
        schedule.after_batch()
        if lookahead is not None:
            lookahead.update()
        if ema is not None:
            ema.update()
        sums += torch.stack(
            [loss.detach().double() * y.numel(), (logits.detach().argmax(1) == y).sum().double()]
        )
        seen += y.numel()
        if not bar.disable and i % 20 == 19:  # running figures: on a terminal only, and
            loss_sum, correct = sums.tolist()  # one host sync per 20 batches, not per batch
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}")
    return _epoch_stats(sums, seen)


def tta_views(tta: str, cfg: Params) -> str:
    """The test-time views ``infer`` takes for a model trained as ``cfg``: ``none`` for the
    models fed precomputed features; ``auto`` follows ``cfg.train.augment`` (the model is
    only shown views like those it was trained on: an MLP trained with flips alone is not
    shown shifted images)."""
    if MODEL_INPUTS[cfg.model] != "images":
        return "none"
    if tta != "auto":
        return tta
    views = {"crop_flip": "flip_translate", "crop_altflip": "flip_translate", "flip": "flip"}
    return views.get(cfg.train.augment, "none")


def shift_one_pixel(x: torch.Tensor, step: int) -> torch.Tensor:
    """``x`` (B x C x H x W) moved one pixel down and right (``step`` 1) or up and left
    (-1); the uncovered row and column repeat the edge's neighbour (reflection)."""
    h, w = x.shape[-2:]
    padded = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    out = padded[..., 1 - step : 1 - step + h, 1 - step : 1 - step + w]
    nhwc = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return out.contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)


def infer(model: nn.Module, x: torch.Tensor, *, amp: bool = False, tta: str = "none"):
    """Float logits of ``x`` (B x C x H x W), averaged over the test-time views of ``tta``:
    ``none``; ``flip``, the image and its mirror image; ``flip_translate``, those (weight
    1/2) and the mirror pairs of the image shifted one pixel down-right and up-left (1/2),
    as airbench evaluates. Each view is one forward pass of the batch."""
    if tta not in ("none", "flip", "flip_translate"):
        raise ValueError(f"tta must be 'none', 'flip' or 'flip_translate', got {tta!r}")
    with autocast(x.device, amp):
        logits = model(x).float()
        if tta == "none":
            return logits
        logits = (logits + model(x.flip(3)).float()) / 2
        if tta == "flip_translate":
            shifted = 0
            for step in (1, -1):
                s = shift_one_pixel(x, step)
                shifted = shifted + model(s).float() + model(s.flip(3)).float()
            logits = logits / 2 + shifted / 8
    return logits


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    amp: bool = False,
    tta: str = "none",
):
    """All logits and labels of a loader, gathered on the device and moved to the CPU once."""
    model.eval()
    outs, labels = [], []
    for x, y in loader:
        outs.append(infer(model, x, amp=amp, tta=tta))
        labels.append(y)
    return torch.cat(outs).cpu(), torch.cat(labels).cpu()


@torch.no_grad()
def validate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    amp: bool = False,
    tta: str = "none",
) -> dict[str, float]:
    """Sample-averaged loss and accuracy (over all ranks' shards when distributed)."""
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64)
    seen = 0
    for x, y in loader:
        logits = infer(model, x, amp=amp, tta=tta)
        sums = sums.to(y.device) + torch.stack(
            [
                nn.functional.cross_entropy(logits, y, reduction="sum").double(),
                (logits.argmax(1) == y).sum().double(),
            ]
        )
        seen += y.numel()
    return _epoch_stats(sums, seen)


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_acc: float = -1.0
    best_val_loss: float = float("inf")
    train_seconds: float = 0.0


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_checkpoint(
    path: Path, model: nn.Module | dict[str, Any], epoch: int, meta: dict[str, Any]
) -> None:
    """state_dict + epoch + the resolved config (``meta``), written atomically."""
    state = model if isinstance(model, dict) else unwrap(model).state_dict()
    save_torch(path, {"model": state, "epoch": epoch, **meta})


def _cpu_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the state_dict that saves to the same bytes as the state_dict itself:
    same OrderedDict type and ``_metadata`` (per-module versions), so a best.pt rewritten
    from it on resume is byte-identical to one written from the model."""
    state = unwrap(model).state_dict()
    out = OrderedDict((k, v.detach().to("cpu", copy=True)) for k, v in state.items())
    out._metadata = state._metadata  # type: ignore[attr-defined]
    return out


def fit(
    model: nn.Module,
    train_loader,
    val_loader,
    cfg: TrainConfig,
    *,
    checkpoint_dir: Path,
    checkpoint_meta: dict[str, Any],
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    schedule: Schedule | None = None,
    device: torch.device | None = None,
    write: bool = True,
    tta: str = "none",
    resume: ResumeStore | None = None,
) -> FitResult:
    """Train for ``cfg.epochs``; keep ``best.pt`` (by val accuracy) and ``last.pt``.

    The optimizer and schedule come from ``cfg`` unless the caller brings its own. With
    ``cfg.ema`` the weight average is what is validated and saved; ``tta`` validates with
    those test-time views (``infer``). ``write=False`` (ranks other than 0) trains in step but
    writes no checkpoint.

    With ``resume``, the full training state is saved after every epoch and, if a saved
    state exists when fit starts, training continues after its last completed epoch and
    ends exactly as an uninterrupted run would (cvplay/resume.py).
    """
    device = device or next(model.parameters()).device
    optimizer = optimizer or make_optimizer(model, cfg)
    schedule = schedule or make_schedule(optimizer, cfg, len(train_loader))
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    ema = EMA(model, cfg.ema) if cfg.ema > 0 else None
    steps = cfg.epochs * len(train_loader)
    lookahead = Lookahead(model, cfg.lookahead, steps) if cfg.lookahead > 0 else None
    result = FitResult()
    generator = getattr(train_loader, "generator", None)
    first, elapsed, best_state = 1, 0.0, None
    state = resume.load() if resume is not None else None
    if state is not None:
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if schedule.scheduler is not None:
            schedule.scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        if lookahead is not None:
            lookahead.load_state_dict(state["lookahead"])
        set_rng_state(state["rng"], generator)
        result.history = state["history"]
        result.best_epoch, result.best_val_acc, result.best_val_loss = state["best"]
        best_state, elapsed = state["best_model"], state["seconds"]
        first = state["epoch"] + 1
        if write:  # DVC removed the stage's outputs before re-running it
            save_checkpoint(
                checkpoint_dir / "best.pt", best_state, result.best_epoch, checkpoint_meta
            )
        print(f"resuming after epoch {state['epoch']} from {resume.path}", file=sys.stderr)
    start = time.perf_counter() - elapsed
    scored = ema.module if ema is not None else model
    amp = amp_enabled(cfg, device)
    for epoch in range(first, cfg.epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        if hasattr(train_loader, "set_epoch"):  # e.g. crop_altflip's flips follow the epoch
            train_loader.set_epoch(epoch)
        tr = train_one_epoch(
            model,
            train_loader,
            optimizer,
            criterion,
            schedule,
            device=device,
            amp=amp,
            desc=f"epoch {epoch}/{cfg.epochs}",
            ema=ema,
            lookahead=lookahead,
            grad_clip=cfg.grad_clip,
        )
        if lookahead is not None and epoch == cfg.epochs:
            lookahead.finish()
        va = validate(scored, val_loader, amp=amp, tta=tta)
        schedule.after_epoch(va["loss"])
        row = {
            "epoch": epoch,
            "train_loss": tr["loss"],
            "train_acc": tr["acc"],
            "val_loss": va["loss"],
            "val_acc": va["acc"],
            "lr": lr,
            "seconds": time.perf_counter() - start,
        }
        result.history.append(row)
        if va["acc"] > result.best_val_acc:
            result.best_epoch, result.best_val_acc, result.best_val_loss = (
                epoch,
                va["acc"],
                va["loss"],
            )
            if resume is not None:
                best_state = _cpu_copy(scored)
            if write:
                save_checkpoint(checkpoint_dir / "best.pt", scored, epoch, checkpoint_meta)
        if resume is not None:
            resume.save(
                {
                    "epoch": epoch,
                    "model": unwrap(model).state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": (
                        schedule.scheduler.state_dict() if schedule.scheduler is not None else None
                    ),
                    "ema": ema.state_dict() if ema is not None else None,
                    "lookahead": lookahead.state_dict() if lookahead is not None else None,
                    "rng": rng_state(generator),
                    "history": result.history,
                    "best": [result.best_epoch, result.best_val_acc, result.best_val_loss],
                    "best_model": best_state,
                    "seconds": row["seconds"],
                }
            )
        if on_epoch is not None:
            on_epoch(row)
    if write:
        save_checkpoint(checkpoint_dir / "last.pt", scored, cfg.epochs, checkpoint_meta)
    result.train_seconds = time.perf_counter() - start
    return result
