from pathlib import Path

import pytest
import yaml

from cvplay.config import (
    ConfigError,
    Params,
    TrainConfig,
    load_params,
    params_from_dict,
    parse_params,
)

ROOT = Path(__file__).resolve().parents[1]


def real_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_params_yaml_holds_every_key_with_its_default():
    # dvc exp run -S only overrides keys that exist, so params.yaml must list them all.
    assert parse_params(real_params()).to_dict().keys() == Params().to_dict().keys()
    raw = real_params()
    for section, values in Params().to_dict().items():
        if isinstance(values, dict) and section != "models":
            assert set(raw[section]) == set(values), section
    assert load_params(ROOT / "params.yaml").model == "simplecnn"


def test_every_registered_model_has_a_recipe_that_resolves():
    # dvc.yaml's train stage depends on models.${model}: the key must exist for every model.
    from cvplay.models import MODELS

    raw = real_params()
    assert set(raw["models"]) == set(MODELS)
    for name in MODELS:
        raw["model"] = name
        params = parse_params(raw)
        for key, value in raw["models"][name].items():
            assert getattr(params.train, key) == value, (name, key)


def test_train_keys_override_recipes_and_null_takes_the_recipe():
    raw = real_params()
    raw["models"]["mlp"] = {"lr": 0.3, "augment": "flip"}
    raw["model"] = "mlp"
    assert parse_params(raw).train.lr == 0.3
    raw["train"]["lr"] = 0.02  # explicit train.* wins over every recipe
    params = parse_params(raw)
    assert (params.train.lr, params.train.augment) == (0.02, "flip")
    raw["models"]["mlp"] = {}  # neither: the TrainConfig default
    raw["train"]["lr"] = None
    assert parse_params(raw).train.lr == TrainConfig().lr
    # the resolved config round-trips (checkpoints store it)
    again = parse_params(params.to_dict())
    assert again == params


def test_editing_one_recipe_leaves_other_models_unchanged():
    raw = real_params()
    before = parse_params(raw).train
    raw["models"]["minivgg"]["lr"] = 0.7
    assert parse_params(raw).train == before


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda p: p.update(model="resnet1000"),
            "model: unknown choice 'resnet1000'; choose one of: ",
        ),
        (lambda p: p["train"].update(epochs="ten"), "train.epochs: expected int, got 'ten'"),
        (lambda p: p["train"].update(epoch=3), "train.epoch: unknown key; did you mean 'epochs'?"),
        (lambda p: p.update(modle="mlp"), "modle: unknown key; did you mean 'model'?"),
        (
            lambda p: p["train"].update(scheduler="cosin"),
            "choose one of: onecycle, cosine, triangle, plateau, none",
        ),
        (lambda p: p["train"].update(augment="cutmix"), "train.augment: unknown choice 'cutmix'"),
        (lambda p: p["train"].update(ema=1.0), "train.ema: must be in [0, 1)"),
        (
            lambda p: p["train"].update(lookahead=-0.5),
            "train.lookahead: must be in [0, 1) (0 = off; airbench: 0.95), got -0.5",
        ),
        (
            lambda p: p["train"].update(muon_momentum=1.0),
            "train.muon_momentum: must be in [0, 1) (Muon's default: 0.95), got 1.0",
        ),
        (
            lambda p: p["train"].update(augment="crop_altflip", loader="folder"),
            "train.augment: crop_altflip needs train.loader: packed",
        ),
        (
            lambda p: p["train"].update(crop_pad_mode="mirror"),
            "train.crop_pad_mode: unknown choice 'mirror'; choose one of: zeros, reflect",
        ),
        (
            lambda p: p["models"]["simplecnn"].update(crop_padding=0),
            "train.crop_padding: must be between 1 and 16 (pixels), got 0",
        ),
        (
            lambda p: p["train"].update(cutout=32),
            "train.cutout: must be between 0 (off) and data.image_size - 1 = 31 (pixels), got 32",
        ),
        (
            lambda p: p["models"]["simplecnn"].update(cutout=-1),
            "train.cutout: must be between 0 (off) and data.image_size - 1 = 31 (pixels), got -1",
        ),
        (lambda p: p["models"]["simplecnn"].update(lrr=1), "models.simplecnn.lrr: unknown key"),
        (
            lambda p: p["models"]["simplecnn"].update(lr="fast"),
            "models.simplecnn.lr: expected float, got 'fast'",
        ),
        (lambda p: p["models"].update(resnet1000={}), "models.resnet1000: unknown choice"),
        (lambda p: p["models"].pop("simplecnn"), "models.simplecnn: missing"),
        (
            lambda p: p["train"].update(scheduler="cosine", warmup_epochs=10),
            "train.warmup_epochs: 10.0 must be less than train.epochs=10",
        ),
        (
            lambda p: p["train"].update(scheduler="triangle", warmup_epochs=12),
            "train.warmup_epochs: 12.0 must be less than train.epochs=10",
        ),
        (
            lambda p: p["models"]["simplecnn"].update(warmup_epochs=0),
            "train.warmup_epochs: onecycle needs a rise: > 0 epochs, or null for 0.25 x train.ep",
        ),
        (
            lambda p: p["train"].update(warmup_epochs=-1),
            "train.warmup_epochs: must be >= 0 (null = the default)",
        ),
        (lambda p: p["train"].update(norm_lr_scale=0), "train.norm_lr_scale: must be > 0, got 0"),
        (lambda p: p["train"].update(lr=0), "train.lr: must be > 0"),
        (lambda p: p["train"].update(batch_size=0), "train.batch_size: must be >= 1"),
        (lambda p: p["model_args"].update(use_bn="yes"), "model_args.use_bn: expected bool"),
        (lambda p: p["data"].update(val_split=1.5), "data.val_split: must be a count"),
        (lambda p: p["train"].update(epochs=True), "train.epochs: expected int, got True"),
        (lambda p: p.update(train=[1, 2]), "train: expected a mapping"),
        (
            lambda p: p["eval"].update(tta="mirror"),
            "eval.tta: unknown choice 'mirror'; choose one of: auto, flip_translate, flip, none",
        ),
        (
            lambda p: p["eval"].update(tta=True),
            "eval.tta: expected str, got True; choose one of: auto, flip_translate, flip, none",
        ),
        (
            lambda p: p["models"]["simplecnn"].update(optimizer=1),
            "models.simplecnn.optimizer: expected str, got 1; choose one of: sgd, adamw, muon",
        ),
    ],
)
def test_bad_params_fail_with_a_message_naming_the_key(mutate, message):
    raw = real_params()
    mutate(raw)
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_choices_list_every_registered_model():
    raw = real_params()
    raw["model"] = "nope"
    with pytest.raises(
        ConfigError,
        match="minivgg, mlp, preactresnet18, resnet18, resnet18_finetune, resnet9, simplecnn, "
        "simpleresnet, vit_tiny",
    ):
        parse_params(raw)


def test_ints_are_accepted_for_floats_and_fraction_val_split():
    raw = real_params()
    raw["train"]["lr"] = 1
    raw["train"]["warmup_epochs"] = 2  # float | None
    raw["data"]["val_split"] = 0.1
    params = parse_params(raw)
    assert params.train.lr == 1.0 and isinstance(params.train.lr, float)
    assert params.train.warmup_epochs == 2.0 and isinstance(params.train.warmup_epochs, float)
    assert params.data.val_split == 0.1


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "params.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_params(bad)


def test_checkpoints_that_stored_tta_as_a_bool_still_load():
    raw = real_params()
    for stored, views in ((True, "flip"), (False, "none")):
        raw["eval"]["tta"] = stored
        assert params_from_dict(raw).eval.tta == views


def test_checkpoints_from_before_onecycle_read_warmup_epochs_still_load():
    # they stored the old default 0.0, which onecycle ignored (its rise was always 0.25)
    raw = real_params()
    raw["train"].update(scheduler="onecycle", warmup_epochs=0.0)
    assert params_from_dict(raw).train.warmup() == 2.5
    raw["train"].update(scheduler="cosine")
    assert params_from_dict(raw).train.warmup() == 0.0
