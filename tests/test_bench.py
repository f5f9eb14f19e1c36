"""The throughput benchmark's command line on a tiny prepared data directory."""

import json
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import yaml
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import profile

from bench.throughput import VARIANTS, recipe, table
from cvplay.config import load_params, parse_params
from cvplay.data import Normalize, load_packed, split_indices
from cvplay.engine import save_checkpoint
from cvplay.models import build_model
from cvplay.prepare import prepare
from tests.conftest import ROOT, tiny_params, tool_env


@pytest.fixture(scope="module")
def prepared(tiny_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "data"
    prepare(str(tiny_folder), max_per_class=None, out_dir=out, workers=1)
    return out


def test_json_has_the_three_figures_per_model(prepared):
    cmd = [sys.executable, "-m", "bench.throughput", "--data", str(prepared), "--models",
           "mlp,simplecnn", "--steps", "2", "--warmup", "1", "--batch-size", "16",
           "--min-seconds", "0", "--no-variants", "--no-write", "--json"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=tool_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout)
    assert set(figures) == {"mlp", "simplecnn"}
    for row in figures.values():
        rates = {"compute_bound", "pipeline", "notebook", "folder_loader"}
        assert set(row) == rates | {"batch_size", "window_steps"}
        assert all(row[k] > 0 for k in rates)
        assert row["batch_size"] == 16 and row["window_steps"] >= 2


def test_variants_time_every_compute_setting(prepared):
    cmd = [sys.executable, "-m", "bench.throughput", "--data", str(prepared), "--models",
           "simplecnn", "--steps", "2", "--warmup", "1", "--batch-size", "8",
           "--min-seconds", "0", "--no-write", "--json"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=tool_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    variants = json.loads(proc.stdout)["simplecnn"]["variants"]
    assert list(variants) == list(VARIANTS)
    assert all(v > 0 for v in variants.values())


def test_each_model_trains_with_its_recipe():
    recipes = load_params(ROOT / "params.yaml").models
    assert recipe("mlp", None).batch_size == recipes["mlp"]["batch_size"]
    assert recipe("simplecnn", None).ema == recipes["simplecnn"]["ema"] > 0
    assert recipe("simplecnn", 16).batch_size == 16


def test_unknown_model_and_missing_data_are_refused(tmp_path):
    cmd = [sys.executable, "-m", "bench.throughput", "--no-write"]
    proc = subprocess.run([*cmd, "--models", "vgg99", "--data", str(tmp_path)], cwd=ROOT,
                          env=tool_env(), capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2 and "unknown model 'vgg99'" in proc.stderr
    proc = subprocess.run([*cmd, "--data", str(tmp_path)], cwd=ROOT, env=tool_env(),
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2 and "run 'dvc repro prepare' first" in proc.stderr


def test_table_shows_ratios():
    row = {"compute_bound": 100.0, "pipeline": 95.0, "notebook": 19.0}
    text = table({"mlp": {**row, "folder_loader": 38.0, "batch_size": 256}})
    assert "| mlp | 256 | 100 | 95 | 19 | 0.95 | 5.00 | 38 | 2.50 |" in text


def test_tta_bench_scores_the_checkpoints_own_val_split(prepared, tmp_path):
    # an untrained simplecnn saved as the pipeline saves it: the scores are what its views
    # give on this split, whatever they are
    params = parse_params(yaml.safe_load(tiny_params(prepared.parent, model="simplecnn")))
    torch.manual_seed(0)
    model = build_model("simplecnn", num_classes=4, model_args=params.model_kwargs()).eval()
    ckpt = tmp_path / "best.pt"
    save_checkpoint(ckpt, model, 1, {"config": params.to_dict(), "classes": list("abcd")})
    cmd = [sys.executable, "-m", "bench.tta", "--checkpoint", str(ckpt), "--data", str(prepared)]
    proc = subprocess.run(cmd, cwd=ROOT, env=tool_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = [r.split("|")[1:4] for r in proc.stdout.splitlines()[2:]]
    assert [r[0].strip() for r in rows] == ["`none`", "`flip`", "`flip_translate`"]
    # the none row is plain argmax accuracy on the checkpoint's 20 val images (seed 42)
    train = load_packed(prepared / "packed" / "train.pt")
    _, val_idx = split_indices(len(train.labels), 20, params.seed)
    x = Normalize(torch.device("cpu"))(train.images[val_idx])
    with torch.no_grad():
        expected = (model(x).argmax(1) == train.labels[val_idx]).float().mean().item()
    assert float(rows[0][1]) == pytest.approx(expected, abs=5e-5)
    for _, val, test in rows:
        assert 0 <= float(val) <= 1 and 0 <= float(test) <= 1


def test_bf16_isa_bench_prints_both_rates_and_their_ratio(prepared, capsys):
    from bench.bf16_isa import main

    main(["--data", str(prepared), "--models", "mlp"])
    out = capsys.readouterr().out.splitlines()
    assert "torch threads" in out[0] and "bf16 units: " in out[0]
    name, fp32, bf16, ratio = (c.strip() for c in out[-1].strip("|").split("|"))
    assert name == "mlp" and float(fp32) > 0 and float(bf16) > 0
    assert float(ratio) == pytest.approx(float(bf16) / float(fp32), abs=0.02)


def test_muon_bf16_bench_times_the_iterations_and_the_training_step_both_ways(prepared, capsys):
    from bench.muon_bf16 import main
    from cvplay.optim import muon_params

    main(
        ["--data", str(prepared), "--models", "simplecnn,mlp", "--batch-size", "4", "--steps", "1"]
    )
    out = capsys.readouterr().out.splitlines()
    assert "torch threads" in out[0]
    rows = [line.strip("|").split("|") for line in out if line.startswith("| ")][1:]
    assert [r[0].strip() for r in rows] == ["simplecnn", "mlp"]  # mlp's recipe is sgd: run as muon
    for name, batch, n, fp32_ms, bf16_ms, fp32, bf16, ratio in rows:
        model = build_model(name.strip(), num_classes=10, model_args={"use_bn": True})
        assert int(n) == len(muon_params(model)) > 0 and int(batch) == 4
        assert float(fp32_ms) >= 0 and float(bf16_ms) >= 0
        assert float(fp32) > 0 and float(bf16) > 0
        low, high = (
            (float(bf16) - 0.05) / (float(fp32) + 0.05),
            (float(bf16) + 0.05) / (float(fp32) - 0.05),
        )
        assert low - 0.005 <= float(ratio) <= high + 0.005


def test_bf16_isa_bench_adds_a_math_attention_row_for_the_vit(prepared, capsys):
    from bench.bf16_isa import main

    main(["--data", str(prepared), "--models", "vit_tiny,mlp", "--batch-size", "2", "--steps", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    names = [row.strip("|").split("|")[0].strip() for row in rows[1:]]
    assert names == ["vit_tiny", "vit_tiny, math attention", "mlp"]
    for row in rows[1:]:
        fp32, bf16, ratio = (float(c) for c in row.strip("|").split("|")[1:])
        assert fp32 > 0 and bf16 > 0
        # the rates are printed to 0.1 img/s, the ratio to 0.01 (of the unrounded rates)
        low, high = (bf16 - 0.05) / (fp32 + 0.05), (bf16 + 0.05) / (fp32 - 0.05)
        assert low - 0.005 <= ratio <= high + 0.005


def test_math_attention_row_really_runs_the_math_kernel():
    # what the bench's second vit_tiny row relies on: sdpa_kernel reaches the encoder's
    # attention in training mode (flash attention is PyTorch's own choice on the CPU)
    model = build_model("vit_tiny", num_classes=10, model_args={}).train()
    x = torch.randn(2, 3, 32, 32)

    def kernels(context) -> set[str]:
        with context, profile() as prof:
            model(x).sum().backward()
        return {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key}

    default, math = kernels(nullcontext()), kernels(sdpa_kernel(SDPBackend.MATH))
    assert any("flash" in k for k in default), default
    assert not any("flash" in k for k in math) and any("math" in k for k in math), math
