"""Shared test helpers: a tiny version of the real GSG config, and fake IDX files."""
import gzip
import os

import numpy as np

from configs import byol, simsiam

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

# --config.KEY=VALUE overrides that shrink configs/simsiam.py to a few seconds of CPU time.
TINY_OVERRIDES = dict(
    batch_size=16, total_steps=4, log_every_steps=1, eval_every_steps=1000, checkpoint_every_steps=2,
    eval_batch_size=32, **{"model.depth": 10, "model.width": 0.125, "model.proj_hidden_dim": 32, "model.proj_out_dim": 32,
                          "model.pred_hidden_dim": 16, "aug.image_size": 16})


def tiny_config(arg=None, method="simsiam", **overrides):
    config = {"simsiam": simsiam, "byol": byol}[method].get_config(arg)
    config.evaluators = ()
    config.update_from_flattened_dict({**TINY_OVERRIDES, **overrides})
    return config


def override_flags(**overrides):
    return [f"--config.{k}={v}" for k, v in {**TINY_OVERRIDES, **overrides}.items()]


def write_idx_dataset(directory, num_train=64, num_test=32, seed=0):
    """Four gzipped IDX files in Fashion-MNIST's layout with random 28x28 images."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    for prefix, n in (("train", num_train), ("t10k", num_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, (n,), dtype=np.uint8)
        with gzip.open(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"), "wb") as f:
            f.write(np.array([0x803, n, 28, 28], ">u4").tobytes() + images.tobytes())
        with gzip.open(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"), "wb") as f:
            f.write(np.array([0x801, n], ">u4").tobytes() + labels.tobytes())
    return directory
