import dataclasses

import pytest
import torch
from torch import nn

from cvplay.config import TrainConfig
from cvplay.engine import fit, make_optimizer, make_schedule, set_seed
from cvplay.models import build_model
from cvplay.optim import MUON_MOMENTUM, MuonAdamW, muon_params, newton_schulz
from cvplay.resume import ResumeStore


def _cfg(**kw):
    base = dict(epochs=3, lr=0.01, scheduler="none", optimizer="muon", weight_decay=0.05)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("shape", [(50, 200), (200, 50), (32, 128)])
def test_newton_schulz_pushes_every_singular_value_toward_one(shape, bf16):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    g[:, 0] *= 100  # badly conditioned: one direction dominates the raw gradient
    out = newton_schulz(g, bf16=bf16)
    assert out.dtype == torch.float32  # back in the gradient's dtype either way
    s = torch.linalg.svdvals(out)
    assert s.min() > 0.6 and s.max() < 1.25
    assert torch.linalg.svdvals(g).max() / torch.linalg.svdvals(g).min() > 50


def test_muon_step_on_a_matrix_matches_torch_muon():
    """torch.optim.Muon (2-d only) with match_rms_adamw is the reference; it orthogonalizes
    in bf16, this in fp32 on the CPU, hence the tolerance."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(64, 32))
    w_ref = nn.Parameter(w.detach().clone())
    ours = MuonAdamW([{"params": [w], "use_muon": True, "weight_decay": 0.1}], lr=0.01)
    ref = torch.optim.Muon([w_ref], lr=0.01, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    start = w.detach().clone()
    for _ in range(3):
        g = torch.randn(64, 32)
        w.grad, w_ref.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    moved, moved_ref = w.detach() - start, w_ref.detach() - start
    assert moved.norm() > 0.05
    assert (moved - moved_ref).norm() < 0.01 * moved_ref.norm()


def test_bf16_cpu_orthogonalizes_in_bf16_and_stays_close_to_torch_muon():
    torch.manual_seed(0)
    w0 = torch.randn(64, 32)
    ws = {bf16: nn.Parameter(w0.clone()) for bf16 in (False, True)}
    w_ref = nn.Parameter(w0.clone())
    opts = {
        bf16: MuonAdamW(
            [{"params": [w], "use_muon": True, "weight_decay": 0.1}], lr=0.01, bf16_cpu=bf16
        )
        for bf16, w in ws.items()
    }
    ref = torch.optim.Muon([w_ref], lr=0.01, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    g = torch.randn(64, 32)
    for w in (*ws.values(), w_ref):
        w.grad = g.clone()
    for opt in (*opts.values(), ref):
        opt.step()
    nesterov = g.lerp(torch.zeros_like(g).lerp(g, 0.05), 0.95)  # first step, momentum 0.95
    by_hand = (w0 * (1 - 0.01 * 0.1)).add(newton_schulz(nesterov, bf16=True), alpha=-0.016)
    torch.testing.assert_close(ws[True].detach(), by_hand, rtol=0, atol=1e-7)
    assert not torch.equal(ws[True].detach(), ws[False].detach())
    moved, moved_ref = ws[True].detach() - w0, w_ref.detach() - w0
    assert (moved - moved_ref).norm() < 0.05 * moved_ref.norm()


def test_train_muon_bf16_cpu_reaches_the_optimizer():
    set_seed(0)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    after = {}
    for flag in (False, True):
        set_seed(0)
        model = build_model("simplecnn", num_classes=10, model_args={})
        opt = make_optimizer(model, _cfg(muon_bf16_cpu=flag))
        assert opt.bf16_cpu is flag
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        after[flag] = [p.detach().clone() for p in model.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(after[False], after[True], strict=True))


def test_train_muon_momentum_reaches_the_hidden_matrices_as_torch_muons_momentum():
    assert TrainConfig().muon_momentum == MUON_MOMENTUM  # config.py cannot import torch
    torch.manual_seed(0)
    grads = [torch.randn(64, 32) for _ in range(3)]  # one step alone: same direction at any m
    moved = {}
    for momentum in (0.6, MUON_MOMENTUM):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 64), nn.Linear(64, 10))
        hidden = model[1].weight
        ref_w = nn.Parameter(hidden.detach().clone())
        opt = make_optimizer(model, _cfg(muon_momentum=momentum))
        assert [g["momentum"] for g in opt.param_groups if g["use_muon"]] == [momentum]
        ref = torch.optim.Muon(
            [ref_w], lr=0.01, weight_decay=0.05, momentum=momentum, adjust_lr_fn="match_rms_adamw"
        )
        start = hidden.detach().clone()
        for g in grads:  # only the hidden matrix has a gradient: Muon's steps alone
            hidden.grad, ref_w.grad = g.clone(), g.clone()
            opt.step()
            ref.step()
        moved[momentum] = hidden.detach() - start
        ref_moved = ref_w.detach() - start
        # torch.optim.Muon orthogonalizes in bf16, this in fp32: 1.3% apart
        assert (moved[momentum] - ref_moved).norm() < 0.03 * ref_moved.norm()
    assert (moved[0.6] - moved[MUON_MOMENTUM]).norm() > 0.1 * moved[0.6].norm()


def test_muon_conv_filters_step_as_their_flattened_matrix():
    torch.manual_seed(0)
    conv = nn.Parameter(torch.randn(16, 8, 3, 3))
    flat = nn.Parameter(conv.detach().reshape(16, 72).clone())
    opts = [
        MuonAdamW([{"params": [p], "use_muon": True, "weight_decay": 0.1}], lr=0.01)
        for p in (conv, flat)
    ]
    for _ in range(2):
        g = torch.randn(16, 8, 3, 3)
        conv.grad, flat.grad = g.clone(), g.reshape(16, 72).clone()
        for opt in opts:
            opt.step()
    assert torch.equal(conv.detach().reshape(16, 72), flat.detach())


def test_the_rest_steps_exactly_as_torch_adamw():
    torch.manual_seed(0)
    b = nn.Parameter(torch.randn(10))
    b_ref = nn.Parameter(b.detach().clone())
    ours = MuonAdamW([{"params": [b], "weight_decay": 0.05}], lr=0.01)
    ref = torch.optim.AdamW([b_ref], lr=0.01, weight_decay=0.05)
    for _ in range(5):
        g = torch.randn(10)
        b.grad, b_ref.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert torch.equal(b, b_ref)


def test_muon_trains_the_hidden_matrices_and_adamw_the_input_head_and_embeddings():
    vit = build_model("vit_tiny", num_classes=10, model_args={})
    opt = make_optimizer(vit, _cfg())
    muon = {id(p) for g in opt.param_groups if g["use_muon"] for p in g["params"]}
    layer = vit.encoder.layers[0]
    attn = layer.self_attn
    for p in (attn.in_proj_weight, attn.out_proj.weight, layer.linear1.weight):
        assert id(p) in muon
    for p in (vit.patch.weight, vit.head.weight, vit.cls, vit.pos, layer.norm1.weight):
        assert id(p) not in muon
    assert len(muon) == 4 * len(vit.encoder.layers)
    # every parameter in exactly one group; the decay rule is param_groups' (none on 1-d
    # tensors and embeddings)
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in vit.parameters())
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(vit.pos) not in decayed and id(layer.linear1.weight) in decayed

    cnn = build_model("simpleresnet", num_classes=10, model_args={"use_bn": True})
    convs = [m.weight for m in cnn.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert muon_params(cnn) == {id(p) for p in convs[1:-1]} and len(convs) > 3


def test_muon_works_with_every_scheduler_and_norm_lr_groups():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 2))
    for scheduler in ("onecycle", "cosine", "triangle", "plateau", "none"):
        cfg = _cfg(scheduler=scheduler, warmup_epochs=1, norm_lr_scale=4.0)
        opt = make_optimizer(model, cfg)
        schedule = make_schedule(opt, cfg, steps_per_epoch=4)
        norm = next(g for g in opt.param_groups if model[1].weight is g["params"][0])
        assert norm["lr"] == pytest.approx(4 * opt.param_groups[0]["lr"])
        for _ in range(3):
            model(torch.randn(2, 4)).sum().backward()
            opt.step()
            opt.zero_grad()
            schedule.after_batch()
        schedule.after_epoch(1.0)


def _conv_blobs(n=128):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, 4, 8, 8, generator=g)
    x[torch.arange(n), y] += 0.5  # the class's channel is brighter
    return [(x[i : i + 32], y[i : i + 32]) for i in range(0, n, 32)]


def _conv_net():
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 16),
        nn.ReLU(),
        nn.Linear(16, 4),
    )


def test_muon_learns_and_an_interrupted_run_resumes_bit_identically(tmp_path):
    data = _conv_blobs()
    cfg = _cfg(scheduler="cosine", warmup_epochs=1, lr=0.05)
    meta = {"config": {"train": dataclasses.asdict(cfg)}, "classes": list("abcd")}

    def run(directory, store, stop_after=None):
        set_seed(0)
        model = _conv_net()

        def on_epoch(row):
            if row["epoch"] == stop_after:
                raise KeyboardInterrupt

        result = fit(
            model, data, data, cfg, checkpoint_dir=directory, checkpoint_meta=meta,
            on_epoch=on_epoch, resume=store,
        )  # fmt: skip
        return model, result

    whole, result = run(tmp_path / "a", ResumeStore("a", directory=tmp_path / "ra"))
    assert result.history[-1]["val_acc"] > 0.9
    assert result.history[-1]["train_loss"] < 0.5 * result.history[0]["train_loss"]
    store = ResumeStore("b", directory=tmp_path / "rb")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", store, stop_after=2)
    assert store.path.exists()
    resumed, _ = run(tmp_path / "b", store)
    for p, q in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(p, q)


def test_muon_groups_hold_matrices_only():
    with pytest.raises(ValueError, match="matrices"):
        MuonAdamW([{"params": [nn.Parameter(torch.zeros(3))], "use_muon": True}], lr=0.1)
