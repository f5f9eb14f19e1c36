import dataclasses
import itertools
from pathlib import Path

import pytest
import torch
from torch import nn

from cvplay.config import Params, TrainConfig
from cvplay.engine import (
    EMA,
    LOOKAHEAD_EVERY,
    Lookahead,
    _cpu_copy,
    accuracy_top1,
    amp_enabled,
    autocast,
    cpu_bf16_units,
    cpu_runs_bf16_natively,
    fit,
    infer,
    machine,
    make_optimizer,
    make_schedule,
    save_checkpoint,
    set_seed,
    shift_one_pixel,
    train_one_epoch,
    tta_views,
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


def test_amp_cpu_switches_bf16_autocast_on_the_cpu_only():
    assert not amp_enabled(TrainConfig(), CPU)  # the default: fp32 on the CPU, bf16 on CUDA
    assert amp_enabled(TrainConfig(), torch.device("cuda"))
    assert amp_enabled(TrainConfig(amp=False, amp_cpu=True), CPU)
    assert not amp_enabled(TrainConfig(amp=True, amp_cpu=True), torch.device("meta"))
    conv, x = nn.Conv2d(3, 4, 3), torch.randn(2, 3, 8, 8)
    with autocast(CPU, True):
        assert conv(x).dtype == torch.bfloat16
    with autocast(CPU, False):
        assert conv(x).dtype == torch.float32


def test_training_under_cpu_bf16_autocast_keeps_fp32_weights_and_learns():
    set_seed(0)
    model = nn.Linear(8, 4)
    cfg = _cfg(amp_cpu=True)
    opt = make_optimizer(model, cfg)
    schedule = make_schedule(opt, cfg, steps_per_epoch=8)
    data = _blobs()
    crit = nn.CrossEntropyLoss()
    amp = amp_enabled(cfg, CPU)
    losses = [
        train_one_epoch(model, data, opt, crit, schedule, device=CPU, amp=amp)["loss"]
        for _ in range(5)
    ]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert losses[-1] < losses[0] * 0.5
    x = torch.cat([b[0] for b in data])
    fp32, bf16 = infer(model, x), infer(model, x, amp=True)
    assert bf16.dtype == torch.float32  # logits come back as float either way
    assert not torch.equal(fp32, bf16)  # ... but from bf16 matmuls
    torch.testing.assert_close(bf16, fp32, rtol=0.05, atol=0.05)
    assert validate(model, data, amp=True)["acc"] > 0.9


def test_bf16_probe_and_machine_agree_with_the_cpu_flags():
    # the train stage warns on train.amp_cpu where this says no (Linux: /proc/cpuinfo)
    flags = {
        f
        for line in Path("/proc/cpuinfo").read_text().splitlines()
        if line.startswith("flags")
        for f in line.split(":", 1)[1].split()
    }
    assert cpu_runs_bf16_natively() == bool({"amx_tile", "avx512_bf16"} & flags)
    units = [
        name
        for name, flag in (("AMX", "amx_tile"), ("AVX512-BF16", "avx512_bf16"))
        if flag in flags
    ]
    assert cpu_bf16_units() == units
    # a run's timing log names them and the SIMD level, which the CPU model name does not
    capability = torch.backends.cpu.get_cpu_capability()
    assert f"({capability}, bf16 units: {'+'.join(units) or 'none'})" in machine()


def test_cpu_bf16_training_is_bit_reproducible():
    def train():
        set_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.LazyLinear(4))
        g = torch.Generator().manual_seed(1)
        data = [(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g))]
        model(data[0][0])  # materialise the lazy layer
        opt = make_optimizer(model, _cfg())
        sched = make_schedule(opt, _cfg(), steps_per_epoch=1)
        for _ in range(3):
            train_one_epoch(model, data, opt, nn.CrossEntropyLoss(), sched, device=CPU, amp=True)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(train(), train())


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


def test_onecycle_rises_over_warmup_epochs_default_a_quarter_of_the_run():
    # 4 epochs of 10 steps: the default rise is 10 steps, warmup_epochs=2 makes it 20
    for warmup, peak in ((None, 9), (2, 19), (0.5, 4)):
        cfg = _cfg(scheduler="onecycle", epochs=4, warmup_epochs=warmup)
        lrs, _ = _lr_trace(cfg, steps_per_epoch=10, n=40)
        assert lrs[0] == pytest.approx(0.1 / 25)
        assert lrs.index(max(lrs)) == peak and max(lrs) == pytest.approx(0.1)
        assert all(a < b for a, b in itertools.pairwise(lrs[: peak + 1]))
        assert all(a > b for a, b in itertools.pairwise(lrs[peak:]))


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


def test_no_weight_decay_on_norm_weights_and_biases_unless_asked():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 5, 5))
    opt = make_optimizer(model, _cfg(weight_decay=0.01))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model[0].weight), id(model[3].weight)}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    from cvplay.models import build_model

    vit = build_model("vit_tiny", num_classes=10, model_args={})
    opt = make_optimizer(vit, _cfg(weight_decay=0.01))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(vit.cls) not in decayed and id(vit.pos) not in decayed
    assert id(vit.patch.weight) in decayed and id(vit.head.weight) in decayed
    opt = make_optimizer(model, _cfg(weight_decay=0.01, decay_norm_bias=True))
    assert all(g["weight_decay"] == 0.01 for g in opt.param_groups)
    assert opt.param_groups[0]["nesterov"] is True


def _lr_trace(cfg, steps_per_epoch, n):
    """The lr of each of ``n`` steps under ``cfg``'s schedule, and the optimizer after them."""
    opt = make_optimizer(nn.Linear(2, 2), cfg)
    schedule = make_schedule(opt, cfg, steps_per_epoch=steps_per_epoch)
    lrs = []
    for _ in range(n):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.after_batch()
    return lrs, opt


def test_cosine_schedule_warms_up_linearly_then_decays_to_zero():
    cfg = _cfg(scheduler="cosine", epochs=4, warmup_epochs=1)
    lrs, opt = _lr_trace(cfg, steps_per_epoch=10, n=40)
    assert lrs[0] == pytest.approx(0.01) and lrs[9] == pytest.approx(0.1)
    assert all(a < b for a, b in itertools.pairwise(lrs[:10]))
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert lrs[-1] < 0.001 and opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_ema_tracks_a_lagged_average_of_weights_and_buffers():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = EMA(model, decay=0.9)
    start = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.add_(1.0)
    ema.update()  # step 1: decay min(0.9, 2/11)
    d = 2 / 11
    assert torch.allclose(ema.module[0].weight, d * start + (1 - d) * model[0].weight)
    assert torch.allclose(ema.module[1].running_mean, torch.full((2,), 1 - d))
    assert ema.module[1].num_batches_tracked == model[1].num_batches_tracked
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_fit_with_ema_validates_and_saves_the_average(tmp_path):
    set_seed(0)
    model = nn.Linear(8, 4)
    data = _blobs()
    meta = {"config": {}, "classes": list("abcd")}
    cfg = _cfg(ema=0.9, epochs=2)
    fit(model, data, data, cfg, checkpoint_dir=tmp_path, checkpoint_meta=meta)
    last = torch.load(tmp_path / "last.pt", weights_only=True)["model"]["weight"]
    assert not torch.equal(last, model.weight.detach())  # the average, not the live weights
    assert (last - model.weight.detach()).abs().max() < 0.5  # ... but close to them


def test_grad_clip_bounds_each_update():
    model = nn.Linear(8, 4)
    cfg = _cfg(lr=1.0, momentum=0.0)
    opt = make_optimizer(model, cfg)
    before = [p.detach().clone() for p in model.parameters()]
    # A huge loss scale: without clipping one SGD step would move the weights by >> 0.1.
    loader = [(x * 100, y) for x, y in _blobs()[:1]]
    train_one_epoch(
        model,
        loader,
        opt,
        nn.CrossEntropyLoss(),
        make_schedule(opt, cfg, 1),
        device=CPU,
        grad_clip=0.1,
    )
    step = torch.cat(
        [(p.detach() - b).flatten() for p, b in zip(model.parameters(), before, strict=True)]
    )
    assert step.norm() == pytest.approx(0.1, rel=1e-4)


def test_flip_tta_averages_the_logits_of_the_image_and_its_mirror():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.LazyLinear(3)).eval()
    x = torch.randn(4, 3, 6, 6)
    model(x)
    with torch.no_grad():
        expected = (model(x) + model(x.flip(3))) / 2
        assert torch.allclose(infer(model, x, tta="flip"), expected)
        assert torch.allclose(infer(model, x.flip(3), tta="flip"), expected, atol=1e-6)
        assert torch.equal(infer(model, x), model(x))
        assert torch.equal(infer(model, x, tta="none"), model(x))


def test_shift_one_pixel_moves_the_image_and_reflects_at_the_edge():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    down_right = shift_one_pixel(x, 1)[0, 0]
    assert torch.equal(down_right[1:, 1:], x[0, 0, :3, :3])  # content moved by (+1, +1)
    assert torch.equal(down_right[0, 1:], x[0, 0, 1, :3])  # row -1 reflects row 1
    up_left = shift_one_pixel(x, -1)[0, 0]
    assert torch.equal(up_left[:3, :3], x[0, 0, 1:, 1:])
    assert torch.equal(up_left[3, :3], x[0, 0, 2, 1:])  # row 4 reflects row 2
    nhwc = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    assert shift_one_pixel(nhwc, 1).is_contiguous(memory_format=torch.channels_last)


def test_flip_translate_tta_weighs_the_flip_pair_half_and_the_shifted_pairs_half():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.LazyLinear(3)).eval()
    x = torch.randn(4, 3, 6, 6)
    model(x)

    def pair(v):
        return (model(v) + model(v.flip(3))) / 2

    with torch.no_grad():
        shifted = (pair(shift_one_pixel(x, 1)) + pair(shift_one_pixel(x, -1))) / 2
        expected = (pair(x) + shifted) / 2
        got = infer(model, x, tta="flip_translate")
        torch.testing.assert_close(got, expected)
        assert not torch.allclose(got, pair(x), atol=1e-4)  # the shifted views count
    with pytest.raises(ValueError, match="tta must be"):
        infer(model, x, tta=True)


@pytest.mark.parametrize(
    ("model", "tta", "augment", "views"),
    [
        ("simplecnn", "auto", "crop_flip", "flip_translate"),
        ("simplecnn", "auto", "crop_altflip", "flip_translate"),
        ("simplecnn", "auto", "flip", "flip"),
        ("simplecnn", "auto", "none", "none"),
        ("simplecnn", "flip", "crop_flip", "flip"),
        ("simplecnn", "flip_translate", "flip", "flip_translate"),
        ("simplecnn", "none", "crop_flip", "none"),
        ("resnet18", "flip", "crop_flip", "none"),  # fed precomputed features, not images
    ],
)
def test_auto_tta_shows_the_model_the_views_it_was_trained_on(model, tta, augment, views):
    cfg = Params(model=model, train=TrainConfig(augment=augment))
    assert tta_views(tta, cfg) == views


def test_best_weights_copy_saves_to_the_same_bytes_as_the_model(tmp_path):
    # On resume, best.pt is rewritten from the copy kept in the resume state; it must be
    # byte-identical to the best.pt written from the model (state_dict type and _metadata).
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(2, 3, 8, 8))
    meta = {"config": {"model": "x"}}
    save_checkpoint(tmp_path / "a.pt", model, 1, meta)
    save_checkpoint(tmp_path / "b.pt", _cpu_copy(model), 1, meta)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()


def test_norm_lr_scale_speeds_up_norm_layers_and_keeps_their_decay_per_step():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 5, 5))
    norm = {id(model[1].weight), id(model[1].bias)}
    for decay_norm_bias in (False, True):
        cfg = _cfg(weight_decay=0.01, decay_norm_bias=decay_norm_bias, norm_lr_scale=64)
        opt = make_optimizer(model, cfg)
        groups = [g for g in opt.param_groups if {id(p) for p in g["params"]} == norm]
        assert len(groups) == 1
        (g,) = groups
        assert g["lr"] == pytest.approx(6.4)
        assert g["weight_decay"] == (pytest.approx(0.01 / 64) if decay_norm_bias else 0.0)
        others = [h for h in opt.param_groups if h is not g]
        assert all(h["lr"] == pytest.approx(0.1) for h in others)
        assert sum(len(h["params"]) for h in opt.param_groups) == len(list(model.parameters()))
    # the schedule scales every group alike
    cfg = _cfg(norm_lr_scale=64, scheduler="triangle", epochs=2, warmup_epochs=1)
    opt = make_optimizer(model, cfg)
    schedule = make_schedule(opt, cfg, steps_per_epoch=5)
    for _ in range(7):
        opt.step()
        schedule.after_batch()
    lrs = sorted(g["lr"] for g in opt.param_groups)
    assert lrs[-1] == pytest.approx(64 * lrs[0]) and lrs[0] == pytest.approx(0.1 * 3 / 5)


def test_triangle_schedule_rises_from_a_fifth_then_falls_linearly_to_zero():
    cfg = _cfg(scheduler="triangle", epochs=5, warmup_epochs=1)
    lrs, opt = _lr_trace(cfg, steps_per_epoch=10, n=50)
    assert lrs[0] == pytest.approx(0.02) and lrs[5] == pytest.approx(0.06)
    assert lrs[10] == pytest.approx(0.1) and lrs[30] == pytest.approx(0.05)
    steps_up = [b - a for a, b in itertools.pairwise(lrs[:11])]
    steps_down = [a - b for a, b in itertools.pairwise(lrs[10:])]
    assert steps_up == pytest.approx([0.008] * 10) and steps_down == pytest.approx([0.0025] * 39)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_lookahead_pulls_the_live_weights_back_to_a_slow_copy_every_5_steps():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    start = model[0].weight.detach().clone()
    look = Lookahead(model, decay=0.95, total_steps=10)
    assert LOOKAHEAD_EVERY == 5

    def step():  # an "optimizer step": every float weight and buffer moves by +1
        with torch.no_grad():
            model[0].weight.add_(1.0)
            model[1].running_mean.add_(1.0)
            model[1].num_batches_tracked.add_(1)
        look.update()

    for _ in range(4):
        step()
    assert torch.equal(model[0].weight, start + 4)  # no sync between multiples of 5
    step()  # step 5: slow moves 1 - 0.95^5 (5/10)^3 of the way to live (5 ahead); live = slow
    slow5 = start + 5 * (1 - 0.95**5 * 0.5**3)
    assert torch.allclose(model[0].weight, slow5)
    assert torch.allclose(model[1].running_mean, torch.full((2,), 5 * (1 - 0.95**5 * 0.5**3)))
    assert model[1].num_batches_tracked == 5  # integer buffers are left alone
    for _ in range(5):
        step()  # step 10: a = 0.95^5
    slow10 = slow5 + 5 * (1 - 0.95**5)
    assert torch.allclose(model[0].weight, slow10)
    with torch.no_grad():
        model[0].weight.add_(3.0)  # live weights wander off; finish() ends on the slow copy
    look.finish()
    assert torch.allclose(model[0].weight, slow10)
    # the state round-trips into a fresh Lookahead (resume)
    again = Lookahead(model, decay=0.95, total_steps=10)
    with torch.no_grad():
        model[0].weight.add_(7.0)
    again.load_state_dict(look.state_dict())
    assert again.steps == 10
    again.finish()
    assert torch.allclose(model[0].weight, slow10)


def test_fit_with_lookahead_ends_on_the_slow_weights_and_saves_them(tmp_path):
    data = _blobs()
    meta = {"config": {}, "classes": list("abcd")}
    runs = {}
    for lookahead in (0.0, 0.95):
        set_seed(0)
        model = nn.Linear(8, 4)
        cfg = _cfg(lookahead=lookahead, epochs=3)
        out = tmp_path / str(lookahead)
        result = fit(model, data, data, cfg, checkpoint_dir=out, checkpoint_meta=meta)
        last = torch.load(out / "last.pt", weights_only=True)["model"]["weight"]
        assert torch.equal(last, model.weight.detach())
        runs[lookahead] = (last, result.history[-1]["val_acc"])
    assert len(data) * 3 >= 2 * LOOKAHEAD_EVERY  # the slow copy was synced during training
    assert not torch.equal(runs[0.0][0], runs[0.95][0])  # ... and it changed the outcome
