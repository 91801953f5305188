"""ImageNet ResNets (parameter counts against torchvision, shapes, zero-init); the effective-rank monitor."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gsg_jax import evaluate, models


def _num_params(tree):
    return sum(x.size for x in jax.tree.leaves(tree))


# torchvision's resnet18/34/50 parameter counts less their 1000-way fc (512 or 2048 inputs, with bias).
@pytest.mark.parametrize("depth,count", [(18, 11_689_512 - 513_000), (34, 21_797_672 - 513_000),
                                         (50, 25_557_032 - 2_049_000)])
def test_imagenet_resnet_parameter_count(depth, count):
    net = models.resnet_imagenet(depth)
    variables = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
    assert _num_params(variables["params"]) == count


def test_resnet50_shapes_and_stride_on_3x3():
    net = models.resnet_imagenet(50, width=0.5, dtype=jnp.bfloat16)
    x = jnp.zeros((2, 64, 64, 3))
    variables = jax.eval_shape(lambda: net.init(jax.random.key(0), x, train=False))
    out, state = jax.eval_shape(lambda v: net.apply(v, x, train=False, capture_intermediates=True,
                                                   mutable=["intermediates"]), variables)
    assert out.shape == (2, 1024) == (2, net.feature_dim)
    assert models.resnet_imagenet(50).feature_dim == 2048
    # 64 px -> 32 after the stem conv -> 16 after the max-pool; stage 2 halves it on its first 3x3 conv.
    block = state["intermediates"]["stage2_block1"]
    assert block["conv1"]["__call__"][0].shape == (2, 16, 16, 64)
    assert block["conv2"]["__call__"][0].shape == (2, 8, 8, 64)
    assert block["conv3"]["__call__"][0].shape == (2, 8, 8, 256)


def test_zero_init_residual_blocks_start_as_their_shortcut():
    # Two bottleneck blocks: the first with a projection shortcut, the second with the identity.
    net = models.ResNet(stage_sizes=(2,), block_cls=models.BottleneckBlock, stem="imagenet", width=1 / 16,
                        zero_init_residual=True)
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    key = jax.random.key(0, impl="rbg")  # compiles in a fraction of threefry's time on CPU; same init code
    variables = jax.jit(lambda k: net.init(k, x, train=False))(key)
    out, state = jax.jit(lambda v: net.apply(v, x, train=False, capture_intermediates=True,
                                             mutable=["intermediates"]))(variables)
    acts = state["intermediates"]
    block1, block2 = acts["stage1_block1"]["__call__"][0], acts["stage1_block2"]["__call__"][0]
    assert block1.shape == (2, 4, 4, 16) and out.shape == (2, 16)
    assert float(jnp.abs(block1).max()) > 0
    np.testing.assert_array_equal(block1, jax.nn.relu(acts["stage1_block1"]["shortcut_bn"]["__call__"][0]))
    np.testing.assert_array_equal(block2, block1)
    assert models.resnet_cifar(18).zero_init_residual is False  # CIFAR default unchanged


def _numpy_effective_rank(z):
    s = np.linalg.svd(np.asarray(z, np.float64), compute_uv=False)
    p = s[s > 0] / s.sum()
    return np.exp(-np.sum(p * np.log(p)))


def test_effective_rank_matches_numpy():
    z = np.random.RandomState(0).randn(64, 16) * np.linspace(0.1, 3.0, 16)
    np.testing.assert_allclose(jax.jit(evaluate.effective_rank)(z), _numpy_effective_rank(z), rtol=1e-5)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_effective_rank_of_rank_k_matrices(k):
    rng = np.random.RandomState(k)
    low_rank = rng.randn(32, k) @ rng.randn(k, 24)
    assert 1 - 1e-4 <= float(evaluate.effective_rank(low_rank)) <= k + 1e-3
    # Equal singular values: exactly k.
    u, v = np.linalg.qr(rng.randn(32, k))[0], np.linalg.qr(rng.randn(24, k))[0]
    np.testing.assert_allclose(evaluate.effective_rank(2.5 * u @ v.T), k, rtol=1e-4)


def test_effective_rank_of_collapsed_batch_is_one():
    z = np.broadcast_to(np.random.RandomState(0).randn(1, 64), (32, 64))
    np.testing.assert_allclose(evaluate.effective_rank(z), 1.0, atol=1e-3)
