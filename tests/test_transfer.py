"""ResNet18 transfer: features stage, frozen backbone, param groups, weights loading."""

import json
from pathlib import Path

import pytest
import torch
from torchvision.models import resnet18

from cvplay import transfer
from cvplay.errors import CvplayError
from cvplay.models import build_model
from cvplay.transfer import (
    FineTuneResNet18,
    build_resnet18,
    frozen_stem,
    precompute_features,
    transfer_optimizer,
)
from tests.conftest import dvc, make_project, tiny_params


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    """A random ResNet18 state_dict on disk: the same loading path as a real weights file."""
    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("w") / "resnet18-random.pth"
    torch.save(resnet18(weights=None).state_dict(), path)
    return path


def test_weights_file_is_loaded_into_the_backbone(weights_file):
    net = build_resnet18(str(weights_file))
    saved = torch.load(weights_file, weights_only=True)
    assert torch.equal(net.layer4[0].conv1.weight, saved["layer4.0.conv1.weight"])
    assert torch.equal(net.conv1.weight, saved["conv1.weight"])


def test_features_shapes_and_dtype(weights_file):
    stem = frozen_stem(build_resnet18(str(weights_file)))
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    feats = precompute_features(
        stem, images, image_size=64, batch_size=2, device=torch.device("cpu")
    )
    assert feats.dtype == torch.float16 and feats.shape == (5, 256, 4, 4)
    flipped = precompute_features(
        stem, images, image_size=64, batch_size=5, device=torch.device("cpu"), flip=True
    )
    assert not torch.equal(feats, flipped)
    # Batching does not change the result.
    one = precompute_features(stem, images, image_size=64, batch_size=5, device=torch.device("cpu"))
    assert torch.allclose(feats.float(), one.float(), atol=1e-2)


def test_frozen_stem_gets_no_gradient_and_head_trains_with_own_lrs():
    net = build_resnet18("none")
    stem = frozen_stem(net)
    head = build_model("resnet18", num_classes=10, model_args={"hidden": 32, "dropout": 0.1})
    head.layer4.load_state_dict(net.layer4.state_dict())
    out = head(stem(torch.randn(2, 3, 64, 64)))
    out.sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in stem.parameters())
    assert all(p.grad is not None for p in head.parameters())
    opt = transfer_optimizer(head, lr_head=1e-3, lr_layer4=1e-4, weight_decay=0.0)
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs == [1e-3, 1e-4]
    head_ids = {id(p) for p in head.head.parameters()}
    layer4_ids = {id(p) for p in head.layer4.parameters()}
    assert {id(p) for p in opt.param_groups[0]["params"]} == head_ids
    assert {id(p) for p in opt.param_groups[1]["params"]} == layer4_ids


def test_finetune_model_trains_every_layer(weights_file):
    model = FineTuneResNet18(num_classes=10, weights=str(weights_file), image_size=32)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.net.fc.out_features == 10


def test_offline_imagenet_error_names_file_directory_and_param(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    # A real download attempt against a port nothing listens on: the offline failure path.
    monkeypatch.setattr(transfer, "RESNET18_URL", "http://127.0.0.1:9/resnet18-f37072fd.pth")
    with pytest.raises(CvplayError) as err:
        build_resnet18("imagenet")
    msg = str(err.value)
    assert "resnet18-f37072fd.pth" in msg
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in msg
    assert "features.weights" in msg and "\n" not in msg


def test_bad_weights_paths(tmp_path):
    with pytest.raises(CvplayError, match="not found"):
        build_resnet18(str(tmp_path / "missing.pth"))
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, wrong)
    with pytest.raises(CvplayError, match="not a ResNet18 state_dict"):
        build_resnet18(str(wrong))


def test_resnet18_pipeline_end_to_end_and_features_stay_cached(tiny_folder, weights_file, tmp_path):
    params = tiny_params(
        tiny_folder, model="resnet18", features={"weights": str(weights_file), "image_size": 64}
    )
    repo = make_project(tmp_path / "proj", params)
    proc = dvc("repro", cwd=repo)
    assert "Running stage 'features'" in proc.stdout
    feats = torch.load(repo / "data/features/train.pt", weights_only=True)
    assert feats["features"].shape == (122, 256, 4, 4) and feats["features"].dtype == torch.float16
    assert feats["flipped"].shape == feats["features"].shape
    ev = json.loads((repo / "metrics/eval.json").read_text())
    assert {"test_acc", "test_loss", "per_class_acc"} <= ev.keys()
    ckpt = torch.load(repo / "models/best.pt", weights_only=True)
    assert ckpt["config"]["model"] == "resnet18"
    assert (repo / "plots/eval/confusion.png").exists()
    proc = dvc("exp", "run", "-S", "model=mlp", cwd=repo)
    assert "Stage 'features' didn't change, skipping" in proc.stdout
    assert "Running stage 'train'" in proc.stdout
    status = dvc("status", "features", cwd=repo).stdout
    assert "changed" not in status
    # Training augmentation lives in cvplay/loaders.py, which the features stage does not
    # read: editing it must invalidate train and evaluate, and keep the features cached.
    with (repo / "cvplay/loaders.py").open("a") as f:
        f.write("\n# an edit\n")
    status = dvc("status", cwd=repo).stdout
    assert "train:" in status and "evaluate:" in status
    assert "features:" not in status
