"""The GSG task: BYOL's EMA target (update, schedule, no gradient), two_crop against four_crop, and the
ViT backbone."""
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from gsg_jax import task as task_lib
from launch import mesh as mesh_lib, train
from tests import helpers


def _batch(batch_size, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, (batch_size, 28, 28, 1), dtype=np.uint8),
            "label": rng.integers(0, 10, (batch_size,)).astype(np.int32)}


def _task(arg=None, method="simsiam", **overrides):
    config = helpers.tiny_config(arg, method, **overrides)
    mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
    return task_lib.make_task(config, mesh), config


def _count_encoder_passes(arg, method):
    """Encoder convolutions in the traced loss, those over a batch of images (the augmentation's vmapped blur
    runs one convolution over batch x channels): proportional to the number of encoder passes."""
    task, config = _task(arg, method)
    params, model_state = task.init(jax.random.key(0))
    jaxpr = jax.make_jaxpr(task.loss)(params, model_state, _batch(config.batch_size), jax.random.key(1))

    def convs(jaxpr):
        count = 0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "conv_general_dilated" and eqn.invars[0].aval.shape[0] == config.batch_size:
                count += 1
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                count += convs(sub)
        return count

    return convs(jaxpr.jaxpr)


@pytest.mark.parametrize("method", ["simsiam", "byol"])
def test_two_crop_does_half_the_encoder_passes_of_four_crop(method):
    four, two = (_count_encoder_passes(f"crops={crops}", method) for crops in ("four_crop", "two_crop"))
    assert four > 0 and four == 2 * two
    assert _count_encoder_passes("gsg=0", method) == two  # the baseline: two views per image


def test_ema_decay_schedules():
    byol = helpers.tiny_config(method="byol").byol
    byol.tau_base = 0.99
    byol.tau_schedule = "constant"
    np.testing.assert_allclose(task_lib.ema_decay(byol, 7, 100), 0.99)
    byol.tau_schedule = "cosine"
    for k, expected in ((0, 0.99), (50, 0.995), (100, 1.0)):
        np.testing.assert_allclose(task_lib.ema_decay(byol, k, 100), expected, rtol=1e-6)


def test_byol_target_gets_no_gradient_and_follows_the_ema_of_the_online_encoder():
    task, config = _task(method="byol")
    params, model_state = task.init(jax.random.key(0))
    target = model_state["target"]["params"]
    assert set(target) == {"backbone", "projector"}
    jax.tree.map(np.testing.assert_array_equal, target, {k: params[k] for k in target})

    def loss_of_target(target_params):
        state = {**model_state, "target": {**model_state["target"], "params": target_params}}
        return task.loss(params, state, _batch(config.batch_size), jax.random.key(1))[0]

    grads = jax.grad(loss_of_target)(target)
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grads))

    # One step of the shared loop: the target moves to tau * target + (1 - tau) * new online parameters.
    mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
    _, state, _, train_step = train.build(config, mesh)
    before = jax.device_get(state.model_state["target"]["params"])
    state, _, finite = train_step(state, mesh_lib.to_global_batch(_batch(config.batch_size), mesh))
    assert bool(finite)
    tau = config.byol.tau_base
    online = jax.device_get({k: state.params[k] for k in before})
    expected = jax.tree.map(lambda t, o: tau * t + (1 - tau) * o, before, online)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), expected,
                 jax.device_get(state.model_state["target"]["params"]))
    assert not np.allclose(jax.tree.leaves(online)[0], jax.tree.leaves(before)[0])



# A tiny peri-LN ViT in place of the tiny ResNet, with a warmup shorter than the tiny run.
TINY_VIT = {"model.depth": 2, "model.width": 32, "model.num_heads": 2, "optimizer.warmup_steps": 1}


def test_build_model_gives_each_backbone_its_own_fields():
    resnet = task_lib.build_model(helpers.tiny_config("dataset=imagenet2012", **{"model.depth": 18})).backbone
    assert (resnet.stem, resnet.width, resnet.zero_init_residual) == ("imagenet", 0.125, True)
    placement = {"model.norm_placement": "pre", "model.norm_type": "rmsnorm"}
    config = helpers.tiny_config("backbone=vit", **TINY_VIT, **placement)
    vit = task_lib.build_model(config).backbone
    assert (vit.num_layers, vit.d_model, vit.num_heads, vit.patch_size) == (2, 32, 2, 4)
    assert (vit.norm_placement, vit.norm_type) == ("pre", "rmsnorm")
    assert "zero_init_residual" not in config.model


def test_vit_backbone_trains_two_steps():
    """GSG SimSiam on the peri-LN ViT through the shared loop: finite losses, and the parameters move."""
    config = helpers.tiny_config("backbone=vit", **TINY_VIT)
    assert config.model.norm_placement == "peri" and config.optimizer.name == "adamw"
    mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
    _, state, _, train_step = train.build(config, mesh)
    assert "backbone" not in state.model_state["batch_stats"]  # layer norms only: no batch statistics
    before = jax.device_get(state.params)
    for seed in range(2):  # two steps: in the first, the warmup's lr 0 moves only the predictor
        batch = mesh_lib.to_global_batch(_batch(config.batch_size, seed), mesh)
        state, metrics, finite = train_step(state, batch)
        assert bool(finite) and np.isfinite(metrics["loss"])
    after = jax.device_get(state.params)
    leaves = zip(jax.tree_util.tree_leaves_with_path(before), jax.tree.leaves(after))
    unmoved = [jax.tree_util.keystr(path) for (path, a), b in leaves if np.array_equal(a, b)]
    # Every parameter moves, but a key bias need not: softmax ignores a shift shared by all keys, so its
    # gradient is zero up to rounding.
    assert all(path.endswith("['key']['bias']") for path in unmoved), unmoved
