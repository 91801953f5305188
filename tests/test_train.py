"""The shared loop, run on the GSG task: sharding invariance, exact resume after a kill, SIGTERM, the NaN
guard, an end-to-end step under tfds mock data and a short run on the real Fashion-MNIST files."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from launch import mesh as mesh_lib, metrics, train
from tests import helpers


def _batch(batch_size, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, (batch_size, 28, 28, 1), dtype=np.uint8),
            "label": rng.integers(0, 10, (batch_size,)).astype(np.int32)}


def test_step_on_8_devices_equals_step_on_1_device():
    config = helpers.tiny_config()
    batch = _batch(config.batch_size)
    results = []
    for devices in (jax.devices()[:1], jax.devices()[:8]):
        mesh = mesh_lib.make_mesh(config.mesh, devices)
        _, state, _, train_step = train.build(config, mesh)
        for _ in range(2):
            state, step_metrics, finite = train_step(state, mesh_lib.to_global_batch(batch, mesh))
        assert bool(finite)
        results.append(jax.device_get((state.params, state.model_state, step_metrics)))
    one, eight = results
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5), one, eight)


def _run_main(workdir, data_dir, idx_dir, *extra, wait=True, env=None, **overrides):
    flags = helpers.override_flags(**{"data.data_dir": data_dir, "data.idx_dir": idx_dir, **overrides})
    cmd = [sys.executable, "-m", "launch.main", "--config=configs/simsiam.py", f"--workdir={workdir}",
           *flags, *extra]
    proc = subprocess.Popen(cmd, cwd=helpers.ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    if wait:
        out, _ = proc.communicate(timeout=600)
        return proc.returncode, out
    return proc


def _final_params(workdir, step):
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state",))
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return restored.state["params"]


@pytest.fixture(scope="module")
def fake_fashion_mnist(tmp_path_factory):
    root = tmp_path_factory.mktemp("fmnist")
    return str(root / "tfds"), helpers.write_idx_dataset(str(root / "idx"))


def test_killed_run_resumes_to_exactly_the_uninterrupted_parameters(tmp_path, fake_fashion_mnist):
    data_dir, idx_dir = fake_fashion_mnist
    steps = dict(total_steps=12, checkpoint_every_steps=2, log_every_steps=2)
    code, out = _run_main(tmp_path / "reference", data_dir, idx_dir, **steps)
    assert code == 0, out

    proc = _run_main(tmp_path / "killed", data_dir, idx_dir, wait=False, **steps)
    deadline = time.time() + 300
    while not os.path.isdir(tmp_path / "killed" / "checkpoints" / "2") and time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    code, out = _run_main(tmp_path / "killed", data_dir, idx_dir, **steps)
    assert code == 0, out
    resumed_at = int(out.split("Resumed from")[1].split("at step ")[1].split(".")[0])
    assert 2 <= resumed_at < 12, out
    reference, resumed = _final_params(tmp_path / "reference", 12), _final_params(tmp_path / "killed", 12)
    jax.tree.map(np.testing.assert_array_equal, reference, resumed)
    logged = [row["step"] for row in metrics.read_metrics(tmp_path / "killed") if "loss" in row]
    assert logged[-1] == 12


def test_sigterm_saves_and_exits_cleanly(tmp_path, fake_fashion_mnist):
    data_dir, idx_dir = fake_fashion_mnist
    proc = _run_main(tmp_path, data_dir, idx_dir, wait=False, total_steps=100000, checkpoint_every_steps=1000)
    deadline = time.time() + 300
    while not metrics.read_metrics(tmp_path) and time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    saved = ocp.CheckpointManager(os.path.join(tmp_path, "checkpoints")).latest_step()
    assert saved is not None and 0 < saved < 100000, out
    assert "Preempted" in out


def test_two_processes_train_and_checkpoint_together(tmp_path, fake_fashion_mnist):
    """Two real processes (4 CPU devices each, gloo collectives) joined by jax.distributed: one 8-device
    mesh, each process feeding its half of the batch, one checkpoint."""
    data_dir, idx_dir = fake_fashion_mnist
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    procs = [_run_main(tmp_path, data_dir, idx_dir, f"--coordinator_address=127.0.0.1:{port}",
                       "--num_processes=2", f"--process_id={i}", wait=False, env=env, total_steps=2)
             for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "mesh {'data': 8" in outs[0], outs[0]
    assert ocp.CheckpointManager(os.path.join(tmp_path, "checkpoints")).latest_step() == 2
    losses = [row["loss"] for row in metrics.read_metrics(tmp_path) if "loss" in row]
    assert len(losses) == 2 and np.isfinite(losses).all()


class _PoisonedTask:
    """Wraps a task so that the loss becomes NaN from the `poison_from`-th batch on."""

    def __init__(self, inner, poison_from):
        self.inner, self.poison_from, self.evaluators = inner, poison_from, {}

    def init(self, rng):
        return self.inner.init(rng)

    def loss(self, params, model_state, batch, rng):
        loss, aux = self.inner.loss(params, model_state, {"image": batch["image"]}, rng)
        return loss * batch["poison"][0], aux

    def train_iterator(self):
        inner, poison_from = self.inner.train_iterator(), self.poison_from

        class Iterator:
            count = 0

            def __next__(self):
                batch = next(inner)
                self.count += 1
                poison = np.nan if self.count >= poison_from else 1.0
                return {**batch, "poison": np.full(len(batch["image"]), poison, np.float32)}

            def get_state(self):  # grain's checkpoint handler stores bytes for non-grain iterators
                return json.dumps(inner.get_state()).encode()

            def set_state(self, state):
                inner.set_state(json.loads(state))

        return Iterator()


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path, monkeypatch,
                                                                    fake_fashion_mnist):
    data_dir, idx_dir = fake_fashion_mnist
    real_make_task = train.make_task
    monkeypatch.setattr(train, "make_task", lambda c, m: _PoisonedTask(real_make_task(c, m), 4))
    config = helpers.tiny_config(total_steps=8, checkpoint_every_steps=2, log_every_steps=4,
                                 **{"data.data_dir": data_dir, "data.idx_dir": idx_dir})
    with pytest.raises(train.NonFiniteError, match="NaN/Inf between steps 2 and 4.*step 2"):
        train.train_and_evaluate(config, str(tmp_path))
    assert ocp.CheckpointManager(os.path.join(tmp_path, "checkpoints")).all_steps() == [2]
    params = _final_params(tmp_path, 2)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_one_step_end_to_end_under_mock_data(tmp_path):
    config = helpers.tiny_config(total_steps=1, evaluators=("knn", "z_std"),
                                 **{"data.data_dir": str(tmp_path / "tfds"),
                                    "data.idx_dir": str(tmp_path / "no_idx_files")})
    with tfds.testing.mock_data(num_examples=64):
        results = train.train_and_evaluate(config, str(tmp_path / "work"))
    assert 0.0 <= results["knn_top1"] <= 1.0 and results["z_std"] > 0
    rows = metrics.read_metrics(tmp_path / "work")
    assert [r["step"] for r in rows if "knn_top1" in r] == [0, 1]
    assert np.isfinite([r["loss"] for r in rows if "loss" in r]).all()


@pytest.mark.skipif(not os.path.isdir(helpers.FASHION_MNIST_DIR), reason="dataset-fashion-mnist missing")
def test_short_run_on_real_fashion_mnist(tmp_path):
    code, out = _run_main(tmp_path / "work", str(tmp_path / "tfds"), helpers.FASHION_MNIST_DIR, total_steps=3,
                          evaluators="('knn','z_std')", eval_every_steps=3, eval_batch_size=2000)
    assert code == 0, out
    rows = [r for r in metrics.read_metrics(tmp_path / "work") if "knn_top1" in r]
    assert [r["step"] for r in rows] == [0, 3]
    # Random features of Fashion-MNIST already classify well above chance (0.1).
    assert all(0.3 < r["knn_top1"] <= 1.0 for r in rows), rows
    assert "knn_top1:" in out and "at step 0 ->" in out
