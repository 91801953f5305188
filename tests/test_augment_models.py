"""Augmentation and model tests: shapes, determinism, exact identities, parameter counts, batch stats."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gsg_jax import augment, models


# ---------------------------------------------------------------------------------------------- augment

def _config(kind, image_size):
    cfg = augment.default_augment_config()
    cfg.image_size = image_size
    channels = 3 if kind.endswith("rgb") else 1
    cfg.mean, cfg.std = (0.5,) * channels, (0.25,) * channels
    if kind.startswith("default"):
        return cfg
    # Everything off; "identity" also fixes the crop to the whole image and undoes normalisation.
    for field in ("flip_prob", "color_jitter_prob", "grayscale_prob"):
        cfg[field] = 0.0
    cfg.blur_prob = cfg.solarize_prob = (0.0, 0.0)  # (first view, second view)
    if kind.startswith("identity"):
        cfg.crop_scale, cfg.crop_ratio = (1.0, 1.0), (1.0, 1.0)
        cfg.mean, cfg.std = (0.0,) * channels, (1.0,) * channels
    return cfg


@functools.cache
def _jitted_batch(kind, image_size, **overrides):
    """One compiled augment_batch per config, shared between tests (XLA:CPU compiles take seconds)."""
    cfg = _config(kind, image_size)
    cfg.update(overrides)
    return jax.jit(lambda images, keys: augment.augment_batch(images, keys, cfg))


def _images(shape, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randint(0, 256, shape), jnp.uint8)


@pytest.mark.parametrize("kind,shape", [("default_gray", (8, 28, 28, 1)), ("default_rgb", (8, 32, 32, 3))])
def test_batch_shape_dtype_finite_deterministic(kind, shape):
    fn = _jitted_batch(kind, shape[1])
    images, keys = _images(shape), jax.random.split(jax.random.key(0), shape[0])
    out = fn(images, keys)
    assert out.shape == shape and out.dtype == jnp.float32
    assert bool(jnp.isfinite(out).all())
    np.testing.assert_array_equal(out, fn(images, keys))  # same keys, same views
    other = fn(images, jax.random.split(jax.random.key(1), shape[0]))
    assert all(not np.allclose(a, b) for a, b in zip(out, other))  # other keys, other views


def test_different_keys_give_different_crops():
    fn = _jitted_batch("crop_only_gray", 28)  # only the random crop is on
    images = jnp.broadcast_to(_images((1, 28, 28, 1)), (8, 28, 28, 1))
    out = np.asarray(fn(images, jax.random.split(jax.random.key(0), 8)))
    for i in range(8):
        for j in range(i):
            assert not np.allclose(out[i], out[j])


def test_identity_config_returns_image_over_255():
    images = _images((4, 32, 32, 3))
    out = _jitted_batch("identity_rgb", 32)(images, jax.random.split(jax.random.key(0), 4))
    np.testing.assert_allclose(out, images / 255.0, atol=1e-5)


def test_flip_is_exact_and_rgb_only_ops_skipped_for_one_channel():
    # Saturation and hue jitter and grayscale are certain here, yet a single-channel image is only flipped.
    fn = _jitted_batch("identity_gray", 28, flip_prob=1.0, color_jitter_prob=1.0,
                       color_jitter=(0.0, 0.0, 0.4, 0.1), grayscale_prob=1.0)
    images = _images((4, 28, 28, 1))
    out = fn(images, jax.random.split(jax.random.key(0), 4))
    np.testing.assert_allclose(out, images[:, :, ::-1] / 255.0, atol=1e-5)


def test_brightness_jitter_applies_to_one_channel():
    # Brightness alone adds one random shift per image, then clips to [0, 1].
    fn = _jitted_batch("identity_gray", 28, color_jitter_prob=1.0, color_jitter=(0.4, 0.0, 0.0, 0.0))
    images = _images((4, 28, 28, 1))
    out = np.asarray(fn(images, jax.random.split(jax.random.key(0), 4)))
    shift = out - np.asarray(images) / 255.0
    for image_out, image_shift in zip(out, shift):
        inside = (image_out > 0) & (image_out < 1)
        assert 0 < abs(image_shift[inside].mean()) <= 0.4
        np.testing.assert_allclose(image_shift[inside], image_shift[inside].mean(), atol=1e-5)


def test_grayscale_applies_to_rgb():
    fn = _jitted_batch("identity_rgb", 32, grayscale_prob=1.0)
    out = np.asarray(fn(_images((2, 32, 32, 3)), jax.random.split(jax.random.key(0), 2)))
    np.testing.assert_allclose(out[..., 0], out[..., 2], atol=1e-5)
    assert not np.allclose(out, _images((2, 32, 32, 3)) / 255.0, atol=1e-2)


def test_preprocess_eval():
    cfg = _config("default_gray", 28)
    images = _images((3, 28, 28, 1))
    np.testing.assert_allclose(augment.preprocess_eval(images, cfg), (images / 255.0 - 0.5) / 0.25, atol=1e-5)
    cfg.image_size = 32
    assert augment.preprocess_eval(images, cfg).shape == (3, 32, 32, 1)


def test_mean_std_must_match_channels():
    cfg = _config("default_rgb", 28)
    with pytest.raises(ValueError, match="mean"):
        jax.eval_shape(lambda im: augment.augment(im, jax.random.key(0), cfg), _images((28, 28, 1)))


# ----------------------------------------------------------------------------------------------- models

def _resnet18_param_count(in_channels, widths=(64, 128, 256, 512)):
    """CIFAR ResNet-18 without the classifier, counted from the architecture: convs have no bias, each BN
    has a scale and a bias, a 1x1 conv + BN shortcut where the width or stride changes."""
    bn = lambda c: 2 * c
    total = 3 * 3 * in_channels * widths[0] + bn(widths[0])  # stem
    c_in = widths[0]
    for c in widths:
        for _ in range(2):
            total += 3 * 3 * c_in * c + bn(c) + 3 * 3 * c * c + bn(c)
            if c_in != c:
                total += c_in * c + bn(c)
            c_in = c
    return total


def _num_params(tree):
    return sum(x.size for x in jax.tree.leaves(tree))


def _numpy_init(model, x):
    """Variables with random values but no jitted init: XLA:CPU compiles threefry draws of rank-4 kernels
    slowly (seconds each), which would dominate these tests."""
    rng = np.random.RandomState(0)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    return jax.tree.map(lambda s: jnp.asarray(rng.uniform(0.5, 1.5, s.shape), s.dtype), shapes)


def test_resnet18_parameter_count():
    net = models.resnet_cifar(18, width=1.0)
    variables = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    assert _num_params(variables["params"]) == _resnet18_param_count(3) == 11_168_832


def test_resnet18_width_quarter_features():
    net = models.resnet_cifar(18, width=0.25)
    x = jnp.zeros((2, 28, 28, 1))
    variables = jax.eval_shape(lambda: net.init(jax.random.key(0), x, train=False))
    assert _num_params(variables["params"]) == _resnet18_param_count(1, (16, 32, 64, 128))
    out = jax.eval_shape(lambda v: net.apply(v, x, train=False), variables)
    assert out.shape == (2, 128) == (2, net.feature_dim)


@pytest.mark.parametrize("use_predictor", [True, False])
def test_siamese_param_tree_and_dtypes(use_predictor):
    model = models.SiameseNet(models.resnet_cifar(18, 0.25, dtype=jnp.bfloat16), proj_hidden_dim=64,
                              proj_out_dim=32, proj_layers=2, pred_hidden_dim=16,
                              use_predictor=use_predictor, dtype=jnp.bfloat16)
    x = jnp.zeros((4, 28, 28, 1))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    assert set(variables["params"]) == ({"backbone", "projector", "predictor"} if use_predictor
                                        else {"backbone", "projector"})
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
    # Last projector BN has no affine parameters, but keeps running statistics.
    assert "bn2" not in variables["params"]["projector"] and "bn2" in variables["batch_stats"]["projector"]
    out = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
    assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
        "features": ((4, 128), jnp.float32), "z": ((4, 32), jnp.float32), "p": ((4, 32), jnp.float32)}


def test_siamese_batch_stats_and_p_is_z_without_predictor():
    model = models.SiameseNet(models.ResNet(stage_sizes=(1, 1), width=0.125), proj_hidden_dim=16,
                              proj_out_dim=8, proj_layers=2, pred_hidden_dim=4, use_predictor=False)
    x = jax.random.normal(jax.random.key(1), (8, 8, 8, 1))
    variables = _numpy_init(model, x)

    @functools.partial(jax.jit, static_argnums=2)
    def apply(v, x, train):
        return model.apply(v, x, train=train, mutable=["batch_stats"])

    out, state = apply(variables, x, True)
    np.testing.assert_array_equal(out["p"], out["z"])
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b), variables["batch_stats"], state["batch_stats"])
    assert all(jax.tree.leaves(changed))
    _, state = apply(variables, x, False)
    jax.tree.map(np.testing.assert_array_equal, variables["batch_stats"], state["batch_stats"])


def test_zero_init_residual():
    net = models.ResNet(stage_sizes=(1,), width=0.125, zero_init_residual=True)
    key = jax.random.key(0, impl="rbg")  # compiles in a fraction of threefry's time on CPU; same init code
    params = jax.jit(lambda k: net.init(k, jnp.zeros((1, 8, 8, 1)), train=False))(key)["params"]
    assert not params["stage1_block1"]["bn2"]["scale"].any()
    assert params["stage1_block1"]["bn1"]["scale"].all()
