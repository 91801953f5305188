"""The language model on the shared loop: a (2, 2, 2) data/fsdp/tensor step equals one device, the
diagnostics at step 0, the dry run, and sampling."""
import os

import jax
import numpy as np
import pytest

from configs import lm
from launch import evaluate, mesh as mesh_lib, metrics, plot, train
from peri_ln import data, generate, task as task_lib

SEQ_LEN = 32


def tiny_lm_config(tmp_path, norm="peri", **overrides):
    """configs/lm.py with a short context, a small batch and a stream of random bytes."""
    rng = np.random.default_rng(0)
    directory = tmp_path / "tokens"
    for split, n in (("train", 20_000), ("validation", 4_000)):
        data.write_token_file(directory, split, rng.integers(0, 256, n), 256)
    config = lm.get_config(f"norm={norm},data=tokens:{directory}")
    config.update_from_flattened_dict({
        "seq_len": SEQ_LEN, "batch_size": 8, "eval_batch_size": 8, "eval_max_batches": 2, "total_steps": 2,
        "log_every_steps": 1, "eval_every_steps": 2, "diag_every_steps": 1, "checkpoint_every_steps": 2,
        "optimizer.warmup_steps": 1, **overrides})
    return config


def _batch(config, seed=0):
    tokens = np.random.default_rng(seed).integers(0, 256, (config.batch_size, config.seq_len + 1))
    return {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32)}


def test_step_on_a_2x2x2_mesh_equals_one_device(tmp_path, norm="peri"):
    # SGD: AdamW's update divides by sqrt(v), so float noise in a ~0 gradient could move it by up to lr.
    config = tiny_lm_config(tmp_path, norm, **{"optimizer.name": "sgd"})
    batch = _batch(config)
    results = []
    for devices, shape in ((jax.devices()[:1], dict(data=1, fsdp=1, tensor=1)),
                           (jax.devices()[:8], dict(data=2, fsdp=2, tensor=2))):
        config.mesh = shape
        mesh = mesh_lib.make_mesh(config.mesh, devices)
        _, state, shardings, train_step = train.build(config, mesh)
        for _ in range(2):
            state, step_metrics, finite = train_step(state, mesh_lib.to_global_batch(batch, mesh))
        assert bool(finite)
        results.append(jax.device_get((state.params, step_metrics)))
    # Parameters really are split on the 8-device mesh: FSDP on "embed", tensor on the MLP.
    mlp_kernel = shardings.params["block_00"]["mlp"]["sublayer"]
    assert any(s.spec != jax.sharding.PartitionSpec() for s in jax.tree.leaves(mlp_kernel))
    one, eight = results
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6), one, eight)


def test_diagnostics_and_eval_loss_are_logged_from_step_0(tmp_path):
    config = tiny_lm_config(tmp_path)
    train.train_and_evaluate(config, str(tmp_path / "work"))
    rows = metrics.read_metrics(tmp_path / "work")
    diag = [r for r in rows if "hidden_var/layer_00" in r]
    assert [r["step"] for r in diag] == [0, 1, 2]
    layers = task_lib.model_lib.SIZES["tiny"]["num_layers"]
    for key in ("hidden_var", "hidden_maxabs", "grad_norm"):
        assert all(f"{key}/layer_{i:02d}" in diag[0] for i in range(layers))
    assert diag[0]["grad_norm"] > 0
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2] and "unigram_entropy" in evals[0]
    assert 0 < evals[0]["unigram_entropy"] <= np.log(256) + 1e-6

    # The figure of hidden variance against depth, and sampling from the checkpoint (launch.sample).
    out = plot.plot([str(tmp_path / "work")], ["hidden_var", "grad_norm"], str(tmp_path / "fig.png"))
    assert os.path.getsize(out) > 1000
    _, task, state, step = evaluate.restore_run(str(tmp_path / "work"))
    assert step == 2
    text = task.sample(state.params, "1,2,3", num_tokens=5, temperature=0.0)
    assert len(text.split(",")) == 5


def test_greedy_generation_follows_the_argmax_of_the_model(tmp_path):
    config = tiny_lm_config(tmp_path)
    model = task_lib.build_model(config, 256)
    params = model.init(jax.random.key(0), np.zeros((1, SEQ_LEN), np.int32))["params"]
    prompt = np.array([[5, 7, 9]], np.int32)
    out = generate.generate(model, params, prompt, jax.random.key(0), num_tokens=4)
    assert out.shape == (1, 4)
    tokens = prompt
    for _ in range(4):  # the same thing, one full forward at a time
        logits = model.apply({"params": params}, tokens)
        tokens = np.concatenate([tokens, np.argmax(logits[:, -1:], axis=-1).astype(np.int32)], axis=1)
    np.testing.assert_array_equal(out, tokens[:, 3:])
    sampled = generate.generate(model, params, prompt, jax.random.key(1), num_tokens=4, temperature=1.0)
    assert sampled.shape == (1, 4) and (np.asarray(sampled) < 256).all()


@pytest.mark.parametrize("size,name", [("400m", 400e6), ("1.5b", 1.5e9), ("3.2b", 3.2e9)])
def test_dry_run_parameter_counts_are_within_10_percent_of_their_names(tmp_path, size, name):
    config = lm.get_config(f"size={size}")
    config.data.source = f"tokens:{tmp_path}"
    data.write_token_file(tmp_path, "train", np.arange(100_000) % 100_352, 100_352)
    config.dry_run = True
    report = train.train_and_evaluate(config, str(tmp_path / "work"))
    assert abs(report["parameters"] - name) / name < 0.10
    # fsdp over all 8 devices: params + AdamW's two moments, about 12 bytes per parameter split 8 ways.
    assert report["train_state_bytes_per_device"] < 12 * report["parameters"] / 8 * 1.05
