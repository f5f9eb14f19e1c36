import dataclasses

import pytest
import torch
from torch import nn

from cvplay.config import TrainConfig
from cvplay.engine import (
    accuracy_top1,
    fit,
    make_optimizer,
    make_schedule,
    set_seed,
    train_one_epoch,
    validate,
)

CPU = torch.device("cpu")


def test_accuracy_top1():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, -1.0], [0.0, 1.0]])
    assert accuracy_top1(logits, torch.tensor([0, 1, 1, 0])).item() == pytest.approx(0.5)


class Fixed(nn.Module):
    """Returns the logits stored per input id (x is a column of ids)."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, x):
        return self.table[x[:, 0].long()]


def test_validate_averages_over_samples_not_batch_means():
    table = torch.tensor([[5.0, 0.0], [5.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    # batch 1: three samples, all right; batch 2: one sample, wrong.
    loader = [
        (torch.tensor([[0.0], [1.0], [2.0]]), torch.tensor([0, 0, 0])),
        (torch.tensor([[3.0]]), torch.tensor([0])),
    ]
    out = validate(Fixed(table), loader)
    assert out["acc"] == pytest.approx(0.75)  # batch-mean average would say 0.5
    per_sample = nn.functional.cross_entropy(table, torch.tensor([0, 0, 0, 0]))
    assert out["loss"] == pytest.approx(per_sample.item(), rel=1e-6)


def _blobs(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, 8, generator=g) * 0.5 + nn.functional.one_hot(y, 8).float() * 2
    return [(x[i : i + 32], y[i : i + 32]) for i in range(0, n, 32)]


def _cfg(**kw):
    base = dict(epochs=5, lr=0.1, scheduler="none", optimizer="sgd", weight_decay=0.0)
    return TrainConfig(**{**base, **kw})


def test_train_one_epoch_learns_and_reports_sample_averages():
    set_seed(0)
    model = nn.Linear(8, 4)
    cfg = _cfg()
    opt = make_optimizer(model, cfg)
    schedule = make_schedule(opt, cfg, steps_per_epoch=8)
    data = _blobs()
    losses = [
        train_one_epoch(model, data, opt, nn.CrossEntropyLoss(), schedule, device=CPU)["loss"]
        for _ in range(5)
    ]
    assert losses[-1] < losses[0] * 0.5
    assert validate(model, data)["acc"] > 0.9


def test_plateau_scheduler_cuts_lr_when_val_loss_stalls():
    model = nn.Linear(2, 2)
    cfg = _cfg(scheduler="plateau", plateau_patience=1, plateau_factor=0.5)
    opt = make_optimizer(model, cfg)
    schedule = make_schedule(opt, cfg, steps_per_epoch=1)
    for val_loss in (1.0, 1.0, 1.0):
        schedule.after_epoch(val_loss)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_onecycle_steps_per_batch_and_ends_near_zero():
    model = nn.Linear(2, 2)
    cfg = _cfg(scheduler="onecycle", epochs=2)
    opt = make_optimizer(model, cfg)
    schedule = make_schedule(opt, cfg, steps_per_epoch=10)
    lrs = []
    for _ in range(20):
        opt.step()
        schedule.after_batch()
        lrs.append(opt.param_groups[0]["lr"])
    assert max(lrs) == pytest.approx(0.1, rel=0.05)
    assert lrs[-1] < 0.02 * max(lrs)


def test_fit_keeps_best_and_last_checkpoints_with_config(tmp_path):
    set_seed(0)
    model = nn.Linear(8, 4)
    data = _blobs()
    meta = {
        "config": {"model": "linear", "train": dataclasses.asdict(_cfg())},
        "classes": list("abcd"),
    }
    seen = []
    result = fit(
        model,
        data,
        data,
        _cfg(),
        checkpoint_dir=tmp_path,
        checkpoint_meta=meta,
        on_epoch=seen.append,
    )
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4, 5] == [r["epoch"] for r in seen]
    best = max(result.history, key=lambda r: r["val_acc"])
    assert result.best_epoch == best["epoch"] and result.best_val_acc == best["val_acc"]
    ckpt = torch.load(tmp_path / "best.pt", weights_only=True)
    assert ckpt["epoch"] == result.best_epoch and ckpt["config"] == meta["config"]
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["epoch"] == 5 and torch.equal(last["model"]["weight"], model.weight.detach())
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temporaries
