import re

import pytest
import torch
from torch import nn

from cvplay.errors import CvplayError
from cvplay.models import (
    MODEL_INPUTS,
    MODELS,
    PreActBlock,
    ResidualBlock,
    ViT,
    build_model,
    count_parameters,
    forward_flops,
    register,
)


def example_input(name: str, n: int = 4) -> torch.Tensor:
    # resnet18 eats the features stage's layer3 activations (256 x s x s), others images.
    return (
        torch.randn(n, 256, 2, 2) if MODEL_INPUTS[name] == "features" else torch.randn(n, 3, 32, 32)
    )


TAKE_USE_BN = ["minivgg", "simplecnn", "simpleresnet"]  # the models that take use_bn


@pytest.mark.parametrize(
    "name, use_bn", [(n, True) for n in sorted(MODELS)] + [(n, False) for n in TAKE_USE_BN]
)
def test_every_model_forwards_and_steps(name, use_bn):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, model_args={"use_bn": use_bn})
    out = model(example_input(name))
    assert out.shape == (4, 7)
    assert torch.isfinite(out).all()
    loss = nn.functional.cross_entropy(out, torch.tensor([0, 1, 2, 3]))
    loss.backward()
    # airbench's whitening filters and BatchNorm scales are frozen: they get no gradient.
    trained = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)
    before = [p.detach().clone() for p in model.parameters()]
    torch.optim.SGD(trained, lr=0.1).step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("name", TAKE_USE_BN)
def test_use_bn_switches_batchnorm_in_conv_models(name):
    with_bn = build_model(name, num_classes=10, model_args={"use_bn": True})
    without = build_model(name, num_classes=10, model_args={"use_bn": False})
    assert any(isinstance(m, nn.BatchNorm2d) for m in with_bn.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in without.modules())
    # Without BN the convs carry their own bias.
    assert all(m.bias is not None for m in without.modules() if isinstance(m, nn.Conv2d))


def test_mlp_is_flatten_two_hidden_layers_and_logits():
    model = build_model("mlp", num_classes=10, model_args={"use_bn": True})
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 3 and linears[0].in_features == 3 * 32 * 32
    assert linears[-1].out_features == 10


def test_registry_refuses_duplicates_and_names_valid_models():
    with pytest.raises(ValueError, match="already registered"):
        register("mlp")(lambda **_: nn.Identity())
    with pytest.raises(
        CvplayError, match="choose one of: airbench, minivgg, mlp, preactresnet18, resnet18, "
    ):
        build_model("vgg99", num_classes=10, model_args={})


@pytest.mark.parametrize(
    "name, key, value, message",
    [
        (
            "resnet9",
            "zero_init_residual",
            True,
            "for preactresnet18, simpleresnet); set it back to false",
        ),
        ("vit_tiny", "use_bn", False, "for minivgg, simplecnn, simpleresnet); set it back to true"),
    ],
)
def test_a_model_arg_the_model_ignores_is_refused_unless_left_at_its_default(
    name, key, value, message
):
    expected = f"params.yaml: model_args.{key}: model {name!r} has no such option (it is {message}"
    with pytest.raises(CvplayError, match=re.escape(expected)):
        build_model(name, num_classes=10, model_args={key: value})
    defaults = {"use_bn": True, "zero_init_residual": False, "hidden": 256}
    assert build_model(name, num_classes=10, model_args=defaults)(torch.zeros(1, 3, 32, 32)).shape


def test_simplecnn_stays_three_conv_bn_relu_blocks_and_a_linear_head():
    model = build_model("simplecnn", num_classes=10, model_args={"use_bn": True})
    kinds = [type(m).__name__ for m in model.modules() if not list(m.children())]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"] * 3 + ["Flatten", "Linear"]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [128, 256, 512]
    # 3x3 convs without bias (BN follows), BN scale+shift, 512*4*4 -> 10 head
    expected = 9 * (3 * 128 + 128 * 256 + 256 * 512) + 2 * (128 + 256 + 512) + 512 * 16 * 10 + 10
    assert count_parameters(model) == expected


def test_next_step_models_have_their_published_shapes():
    def build(name):
        return build_model(name, num_classes=10, model_args={"use_bn": True})

    # PreAct ResNet-18 for CIFAR: Kuang Liu's pytorch-cifar has 11,171,146 parameters; we add
    # the paper's final BN-ReLU before pooling (512 scales + 512 shifts).
    assert count_parameters(build("preactresnet18")) == 11_171_146 + 1024
    # ResNet-9 (Page / DAWNBench): 6.57M parameters, bias-free 512 -> 10 head.
    assert count_parameters(build("resnet9")) == 6_573_120
    vit = build("vit_tiny")
    assert vit.patch.kernel_size == (4, 4) and vit.pos.shape == (1, 8 * 8 + 1, 192)
    assert len(vit.encoder.layers) == 6


def _shortcut(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a residual block computes without its branch."""
    if isinstance(block, ResidualBlock):
        return torch.relu(block.shortcut(x))
    return x if block.shortcut is None else block.shortcut(torch.relu(block.bn1(x)))


@pytest.mark.parametrize(
    "name, use_bn, blocks",
    [("simpleresnet", True, 6), ("simpleresnet", False, 6), ("preactresnet18", True, 8)],
)
def test_zero_init_residual_starts_each_block_as_its_shortcut_and_still_learns(
    name, use_bn, blocks
):
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for zero in (True, False):
        torch.manual_seed(0)
        args = {"use_bn": use_bn, "zero_init_residual": zero}
        model = build_model(name, num_classes=10, model_args=args).eval()
        seen: list = []

        def record(m, i, o, seen=seen):
            seen.append((m, i[0].clone(), o.clone()))

        for m in model.modules():
            if isinstance(m, (ResidualBlock, PreActBlock)):
                m.register_forward_hook(record)
        out = model(x)
        assert len(seen) == blocks
        same = [torch.allclose(o, _shortcut(m, i), atol=1e-6) for m, i, o in seen]
        assert all(same) if zero else not any(same)
        # the zeroed layers (one weight per block) get a gradient, so the branches learn
        zeroed = [p for n, p in model.named_parameters() if n.endswith("weight") and not p.any()]
        assert len(zeroed) == (blocks if zero else 0)
        nn.functional.cross_entropy(out, torch.arange(4)).backward()
        assert all(p.grad.abs().sum() > 0 for p in zeroed)


def test_forward_flops_matches_the_hand_count_and_leaves_the_model_alone():
    model = build_model("simplecnn", num_classes=10, model_args={"use_bn": True})
    model.train()
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    stats = bn.running_mean.clone()
    convs = [(3, 128, 32), (128, 256, 16), (256, 512, 8)]  # (c_in, c_out, spatial size)
    expected = sum(2 * ci * co * 9 * s * s for ci, co, s in convs) + 2 * 512 * 16 * 10
    assert forward_flops(model, torch.randn(2, 3, 32, 32)) == expected
    assert model.training and torch.equal(bn.running_mean, stats)


def test_forward_flops_counts_the_vit_encoder_whatever_its_number_of_heads():
    # Even head counts send eval-mode nn.TransformerEncoderLayer down PyTorch's fused fast
    # path, one op the counter cannot see (it counted only the patch embedding: 1.2 M).
    example = torch.zeros(2, 3, 32, 32)
    counts = {
        heads: forward_flops(ViT(num_classes=10, patch=4, dim=192, depth=6, heads=heads), example)
        for heads in (3, 6)
    }
    assert counts[3] == counts[6] > 200e6
    assert torch.backends.mha.get_fastpath_enabled()  # left as it was


def test_airbench_whitening_from_data_decorrelates_2x2_patches():
    torch.manual_seed(0)
    x = torch.randn(100, 3, 32, 32)
    x[:, 1] = 0.8 * x[:, 0] + 0.6 * x[:, 1]  # correlated colour channels
    x = x + 0.5 * x.roll(1, dims=3)  # and neighbouring pixels
    model = build_model("airbench", num_classes=10, model_args={})
    before = model.whiten.weight.clone()
    model.data_init(x)
    assert not torch.equal(before, model.whiten.weight)
    with torch.no_grad():
        out = model.whiten(x) - model.whiten.bias.view(1, -1, 1, 1)
    z = out.permute(1, 0, 2, 3).reshape(24, -1)
    cov = z[:12] @ z[:12].T / z.shape[1]
    # unit variance along each principal direction (eps = 5e-4 shrinks the smallest a bit),
    # no correlation between them, and the other 12 channels are their negatives
    assert torch.allclose(cov.diag(), torch.ones(12), atol=0.02)
    assert (cov - torch.diag(cov.diag())).abs().max() < 1e-3
    assert torch.allclose(z[12:], -z[:12], atol=1e-5)
    assert not model.whiten.weight.requires_grad and model.whiten.bias.requires_grad


def test_airbench_is_dirac_initialised_with_fixed_batchnorm_scales():
    model = build_model("airbench", num_classes=10, model_args={})
    conv = model.groups[0].conv1  # 24 -> 64: the first 24 filters pass their channel through
    x = torch.randn(2, 24, 9, 9)
    assert torch.allclose(nn.functional.conv2d(x, conv.weight[:24], padding=1), x, atol=1e-6)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 6
    assert all(not m.weight.requires_grad and m.bias.requires_grad for m in bns)
    # running statistics follow the last few batches: 0.6 old + 0.4 new (airbench's)
    bn = bns[0].train()
    bn(torch.full((4, 64, 3, 3), 5.0))
    assert torch.allclose(bn.running_mean, torch.full((64,), 2.0))
    # 32 -> 31 (2x2 whitening) -> 15 -> 7 -> 3 -> 1
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
