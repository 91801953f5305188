"""Linear probe on a pretraining checkpoint (gsg_jax.linear_eval through the shared loop), and evaluators on
a saved checkpoint without training (launch.evaluate). One tiny SimSiam pretraining of 2 steps on fake
Fashion-MNIST files serves every test."""
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import linear_eval as linear_eval_config
from launch import evaluate, mesh as mesh_lib, metrics, train
from tests import helpers


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Workdir of a 2-step tiny SimSiam pretraining (checkpoint at step 2). Its compilation (~60 s on 2
    CPU cores) is most of this file's time."""
    root = tmp_path_factory.mktemp("linear_eval")
    data = {"data.data_dir": str(root / "tfds"), "data.idx_dir": helpers.write_idx_dataset(str(root / "idx"))}
    # The baseline (gsg=0): two views per step instead of four compile ~10 s faster; any method would do.
    config = helpers.tiny_config("gsg=0", total_steps=2, **data)
    train.train_and_evaluate(config, str(root / "pretrain"))
    return str(root / "pretrain")


@pytest.fixture(scope="module")
def linear_run(pretrained, tmp_path_factory):
    """(config, workdir, results) of a 2-step linear probe on `pretrained`."""
    config = linear_eval_config.get_config(f"checkpoint={pretrained}")
    config.update_from_flattened_dict(dict(total_steps=2, batch_size=16, eval_batch_size=32,
                                           log_every_steps=1, eval_every_steps=2, checkpoint_every_steps=2))
    workdir = str(tmp_path_factory.mktemp("linear_eval") / "linear")
    return config, workdir, train.train_and_evaluate(config, workdir)


def _restore_state(workdir, step):
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state",))
    return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state


def test_linear_probe_writes_linear_top1(linear_run):
    _, workdir, results = linear_run
    assert 0.0 <= results["linear_top1"] <= 1.0
    rows = metrics.read_metrics(workdir)
    assert [r["step"] for r in rows if "linear_top1" in r] == [2]
    assert np.isfinite([r["loss"] for r in rows if "loss" in r]).all()


def test_backbone_is_frozen(pretrained, linear_run):
    config, workdir, _ = linear_run
    before, after = _restore_state(pretrained, 2), _restore_state(workdir, 2)
    frozen = after["model_state"]["backbone"]
    # Bit-identical weights and batch-norm averages after training; the optimizer only holds the classifier.
    pretrained_backbone = {"params": before["params"]["backbone"],
                           "batch_stats": before["model_state"]["batch_stats"]["backbone"]}
    jax.tree.map(np.testing.assert_array_equal, frozen, pretrained_backbone)
    assert set(after["params"]) == {"fc"}

    # And no gradient reaches the backbone.
    task = train.make_task(config, mesh_lib.make_mesh(config.mesh))
    batch = {"image": np.random.default_rng(0).integers(0, 256, (8, 28, 28, 1), dtype=np.uint8),
             "label": np.arange(8, dtype=np.int32)}
    grads = jax.jit(jax.grad(lambda state: task.loss(after["params"], state, batch, jax.random.key(0))[0]))(
        after["model_state"])
    assert all(not np.any(g) for g in jax.tree.leaves(grads["backbone"]))


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="needs the pretraining run's workdir"):
        linear_eval_config.get_config()
    with pytest.raises(ValueError, match="No checkpoint in"):
        linear_eval_config.get_config(f"checkpoint={tmp_path}")
    assert os.listdir(tmp_path) == []


def test_evaluate_command_on_pretraining_checkpoint(pretrained):
    command = [sys.executable, "-m", "launch.evaluate", f"--workdir={pretrained}", "--evaluators=knn"]
    out = subprocess.run(command, cwd=helpers.ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "eval step 2: knn_top1" in out.stdout
    last = metrics.read_metrics(pretrained)[-1]
    assert last["step"] == 2 and 0.0 <= last["knn_top1"] <= 1.0 and set(last) == {"step", "knn_top1"}


def test_evaluate_reproduces_the_linear_probe_result(linear_run):
    _, workdir, results = linear_run
    step, evaluated = evaluate.evaluate(workdir, ["linear"])
    assert step == 2 and evaluated == results
