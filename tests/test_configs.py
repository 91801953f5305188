"""Every config in configs/, with its main args, builds and trains two steps under tfds mock data."""
import importlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import linear_eval as configs_linear_eval
from launch import metrics, train
from peri_ln import data as peri_ln_data
from tests import helpers

CASES = [
    ("simsiam", ""),
    ("simsiam", "gsg=0"),
    ("simsiam", "predictor=0"),
    ("simsiam", "crops=two_crop,batch=64"),
    ("simsiam", "dataset=cifar10"),
    ("simsiam", "dataset=imagenet2012"),
    ("simsiam", "backbone=vit"),
    ("byol", ""),
    ("byol", "gsg=0,predictor=0"),
    ("lm", "norm=pre"),
    ("lm", "norm=output"),
    ("linear_eval", "checkpoint=PRETRAINED"),  # the tiny default simsiam config, trained two steps first
]


def tiny(name, arg, tmp_path):
    config = importlib.import_module(f"configs.{name}").get_config(arg)
    if name == "lm":  # a short context and batch over random bytes written as a token corpus
        rng = np.random.default_rng(0)
        for split in ("train", "validation"):
            peri_ln_data.write_token_file(tmp_path / "tokens", split, rng.integers(0, 256, 5_000), 256)
        config.update_from_flattened_dict({
            "data.source": f"tokens:{tmp_path / 'tokens'}", "seq_len": 32, "batch_size": 8, "total_steps": 2,
            "log_every_steps": 1, "checkpoint_every_steps": 2, "optimizer.warmup_steps": 1})
        config.evaluators = ()
        return config
    overrides = {**helpers.TINY_OVERRIDES, "total_steps": 2, "checkpoint_every_steps": 2,
                 "data.data_dir": str(tmp_path / "tfds"), "data.idx_dir": str(tmp_path / "no_idx_files")}
    if config.model.backbone == "vit":  # a tiny ViT (an int width, not the ResNet's multiplier); a short warmup
        overrides.update({"model.depth": 2, "model.width": 32, "model.num_heads": 2, "optimizer.warmup_steps": 1})
    config.update_from_flattened_dict(overrides)
    if config.model.backbone == "resnet_imagenet":
        config.model.depth = 18  # the smallest ImageNet ResNet
    config.evaluators = ()
    return config


@pytest.mark.parametrize("name,arg", CASES, ids=[f"{n}:{a}" for n, a in CASES])
def test_config_trains_two_steps_under_mock_data(name, arg, tmp_path):
    with tfds.testing.mock_data(num_examples=64):
        if name == "linear_eval":
            train.train_and_evaluate(tiny("simsiam", "", tmp_path), str(tmp_path / "pretrained"))
            config = configs_linear_eval.get_config(f"checkpoint={tmp_path / 'pretrained'}")
            config.update_from_flattened_dict({"batch_size": 16, "total_steps": 2, "log_every_steps": 1,
                                               "checkpoint_every_steps": 2, "eval_batch_size": 32})
            config.evaluators = ()
        else:
            config = tiny(name, arg, tmp_path)
        train.train_and_evaluate(config, str(tmp_path / "work"))
    losses = [row["loss"] for row in metrics.read_metrics(tmp_path / "work") if "loss" in row]
    assert len(losses) == 2 and np.isfinite(losses).all()
