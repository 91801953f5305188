"""peri_ln.model: each norm placement against a plain-jnp reference, Peri-LN's unit-RMS increments,
causality, parameter counts of the paper's sizes, logical axis names, and the ViT backbone."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from gsg_jax.models import SiameseNet
from peri_ln import model

D, HEADS, HEAD_DIM, MLP, EPS = 16, 2, 8, 32, 1e-5


def normal(*shape):
    # numpy, not jax.random: XLA:CPU compiles threefry draws slowly, and these tests are mostly compile time
    return np.random.default_rng(0).standard_normal(shape, np.float32)


# ---------------------------------------------------------------- reference written with plain jnp
def ref_norm(x, p, norm_type):
    if norm_type == "layernorm":
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / jnp.sqrt(var + EPS) * p["scale"] + p["bias"]
    return x / jnp.sqrt((x ** 2).mean(-1, keepdims=True) + EPS) * p["scale"]


def ref_rope(x, base=10_000.0):
    # Pairs (i, i + H/2) as complex numbers, rotated by position * base^(-2i/H).
    half = x.shape[-1] // 2
    theta = jnp.arange(x.shape[1])[:, None] * base ** (-2.0 * jnp.arange(half) / x.shape[-1])
    z = (x[..., :half] + 1j * x[..., half:]) * jnp.exp(1j * theta)[None, :, None, :]
    return jnp.concatenate([z.real, z.imag], axis=-1)


def ref_linear(x, p, spec):
    return jnp.einsum(spec, x, p["kernel"]) + p.get("bias", 0.0)


def ref_attention(x, p, norm_type, causal):
    q, k, v = (ref_linear(x, p[n], "btd,dnh->btnh") for n in ("query", "key", "value"))
    if "query_norm" in p:
        q, k = ref_norm(q, p["query_norm"], norm_type), ref_norm(k, p["key_norm"], norm_type)
    q, k = ref_rope(q), ref_rope(k)
    logits = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    if causal:
        logits = jnp.where(jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool)), logits, -jnp.inf)
    out = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, axis=-1), v)
    return ref_linear(out, p["out"], "btnh,nhd->btd")


def ref_mlp(x, p):
    up = ref_linear(x, p["up"], "btd,dm->btm")
    if "gate" in p:
        gate = ref_linear(x, p["gate"], "btd,dm->btm")
        h = gate * jax.nn.sigmoid(gate) * up
    else:
        h = 0.5 * up * (1.0 + jax.scipy.special.erf(up / np.sqrt(2.0)))
    return ref_linear(h, p["down"], "btm,md->btd")


def ref_residual(x, p, f, placement, norm_type):
    def norm(name, y):
        return ref_norm(y, p[name], norm_type)

    if placement == "post":
        return norm("norm_post", x + f(x))
    if placement == "pre":
        return x + f(norm("norm_in", x))
    if placement == "peri":
        return x + norm("norm_out", f(norm("norm_in", x)))
    return x + norm("norm_out", f(x))


def ref_block(x, p, placement, norm_type, causal):
    attn = functools.partial(ref_attention, p=p["attn"]["sublayer"], norm_type=norm_type, causal=causal)
    x = ref_residual(x, p["attn"], attn, placement, norm_type)
    return ref_residual(x, p["mlp"], functools.partial(ref_mlp, p=p["mlp"]["sublayer"]), placement, norm_type)


def random_variables(module, *args, gain_noise=0.3, **kwargs):
    """Random variables in the shapes module.init gives, without compiling init (XLA:CPU compiles a real
    init's threefry draws slowly): gains 1 + gain_noise N(0, 1), biases gain_noise N(0, 1), the rest
    0.3 N(0, 1)."""
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path[-1:], simple=True)
        noise = rng.standard_normal(leaf.shape, np.float32)
        return jnp.asarray(1.0 + gain_noise * noise if name == "scale" else
                           (gain_noise if name == "bias" else 0.3) * noise)

    shapes = nn.unbox(jax.eval_shape(functools.partial(module.init, **kwargs), jax.random.key(0), *args))
    return jax.tree_util.tree_map_with_path(fill, shapes)


# ---------------------------------------------------------------- the block
# The other options vary with the norm type, so every one of them meets every placement.
OPTIONS = {"layernorm": dict(mlp_type="gelu", use_bias=True),
           "rmsnorm": dict(mlp_type="swiglu", qk_norm=True)}
BLOCK_CASES = [(p, n, True) for p in model.PLACEMENTS for n in model.NORM_TYPES]
BLOCK_CASES.append(("peri", "layernorm", False))  # and one without the causal mask


@pytest.mark.parametrize("placement,norm_type,causal", BLOCK_CASES)
def test_block_matches_reference(placement, norm_type, causal):
    block = model.Block(num_heads=HEADS, head_dim=HEAD_DIM, mlp_dim=MLP, norm_placement=placement,
                        norm_type=norm_type, norm_eps=EPS, causal=causal, **OPTIONS[norm_type])
    x = normal(2, 6, D)
    variables = random_variables(block, x)
    expected = ref_block(x, variables["params"], placement, norm_type, causal)
    np.testing.assert_allclose(jax.jit(block.apply)(variables, x), expected, rtol=1e-4, atol=1e-4)


def test_init_gains_are_one_and_biases_zero():
    block = model.Block(num_heads=HEADS, head_dim=HEAD_DIM, mlp_dim=MLP, qk_norm=True, use_bias=True)
    params = nn.unbox(jax.jit(block.init)(jax.random.key(0), jnp.ones((1, 2, D))))["params"]
    flat = {jax.tree_util.keystr(path, simple=True, separator="/"): p
            for path, p in jax.tree_util.tree_leaves_with_path(params)}
    assert len([k for k in flat if k.endswith(("norm_in/scale", "norm_out/scale"))]) == 4
    for name, p in flat.items():
        expected = {"scale": 1.0, "bias": 0.0}.get(name.rsplit("/", 1)[-1])
        if expected is not None:
            np.testing.assert_array_equal(p, expected, err_msg=name)


def test_peri_rmsnorm_increments_have_unit_rms():
    block = model.Block(num_heads=HEADS, head_dim=HEAD_DIM, mlp_dim=MLP, norm_placement="peri",
                        norm_type="rmsnorm")
    x = 5.0 * normal(2, 6, D)
    variables = random_variables(block, x, gain_noise=0.0)  # unit gains, as at initialisation
    apply = functools.partial(block.apply, capture_intermediates=True, mutable=["intermediates"])
    out, state = jax.jit(apply)(variables, x)
    after_attn = state["intermediates"]["attn"]["__call__"][0]
    for increment in (after_attn - x, out - after_attn):
        np.testing.assert_allclose(jnp.sqrt(jnp.mean(increment ** 2, axis=-1)), 1.0, atol=1e-3)


# ---------------------------------------------------------------- the language model
def test_lm_is_causal_and_returns_hidden_states():
    lm = model.TransformerLM(vocab_size=16, num_layers=2, d_model=32, num_heads=2, mlp_dim=64, max_len=8,
                             qk_norm=True)
    tokens = np.random.default_rng(0).integers(0, 16, (2, 8), np.int32)
    variables = random_variables(lm, tokens)
    apply = jax.jit(functools.partial(lm.apply, return_hidden=True))
    logits, hidden = apply(variables, tokens)
    assert logits.shape == (2, 8, 16) and logits.dtype == jnp.float32
    assert hidden.shape == (2, 2, 8, 32)
    tokens[:, 5] = (tokens[:, 5] + 1) % 16
    changed, _ = apply(variables, tokens)
    np.testing.assert_array_equal(changed[:, :5], logits[:, :5])
    assert not np.allclose(changed[:, 5], logits[:, 5])


@pytest.mark.parametrize("size,target", [("400m", 400e6), ("1.5b", 1.5e9), ("3.2b", 3.2e9)])
def test_paper_sizes_match_their_names(size, target):
    assert abs(model.count_params(model.SIZES[size], 100_352) / target - 1) < 0.1


@pytest.mark.parametrize("placement,norms", [("post", set()), ("pre", {"final_norm"}),
                                             ("peri", {"embed_norm", "final_norm"}),
                                             ("output", {"final_norm"})])
def test_default_embedding_and_final_norms(placement, norms):
    lm = model.TransformerLM(vocab_size=16, num_layers=1, d_model=32, num_heads=2, mlp_dim=64,
                             norm_placement=placement)
    params = jax.eval_shape(lm.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    assert {k for k in params if k.endswith("_norm")} == norms


ALL_OPTIONS = dict(tied_embeddings=False, use_bias=True, qk_norm=True, norm_type="layernorm")


@pytest.mark.parametrize("module,inputs,kwargs", [
    (model.TransformerLM(**model.SIZES["tiny"], **ALL_OPTIONS), jnp.zeros((1, 4), jnp.int32), {}),
    (model.TransformerLM(**model.SIZES["tiny"], norm_placement="post"), jnp.zeros((1, 4), jnp.int32), {}),
    (model.TransformerLM(vocab_size=100_352, **model.SIZES["400m"]), jnp.zeros((1, 4), jnp.int32), {}),
    (model.vit(depth=2, width=32, num_heads=2, qk_norm=True), jnp.zeros((1, 8, 8, 3)), {"train": False}),
], ids=["lm_all_options", "lm_post", "lm_400m", "vit"])
def test_every_parameter_has_logical_axis_names(module, inputs, kwargs):
    boxed = jax.eval_shape(functools.partial(module.init, **kwargs), jax.random.key(0), inputs)["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert all(isinstance(p, nn.Partitioned) and len(p.names) == p.value.ndim for p in leaves)
    specs = jax.tree.leaves(nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, P))
    assert all(any(name is not None for name in spec) for spec in specs)


def test_rule_table_shards_the_parameters():
    lm = model.TransformerLM(vocab_size=64, num_layers=1, d_model=32, num_heads=2, mlp_dim=64,
                             tied_embeddings=False, use_bias=True)
    tokens = np.zeros((4, 4), np.int32)
    boxed = jax.eval_shape(lm.init, jax.random.key(0), tokens)
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    rules = (("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("vocab", "tensor"),
             ("activation_batch", ("data", "fsdp")), ("activation_length", None), ("activation_embed", None))
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)["params"]
    block = shardings["block_00"]
    assert shardings["embed"]["embedding"].spec == P("tensor", "fsdp")
    assert shardings["head"]["kernel"].spec == P("fsdp", "tensor")
    assert block["attn"]["sublayer"]["query"]["kernel"].spec == P("fsdp", "tensor", None)
    assert block["attn"]["sublayer"]["out"]["kernel"].spec == P("tensor", None, "fsdp")
    assert block["mlp"]["sublayer"]["down"]["kernel"].spec == P("tensor", "fsdp")
    assert block["mlp"]["norm_out"]["scale"].spec == P(None)
    # The model also runs with the rules in context, where flax checks every parameter's names against its
    # shape and the residual stream gets its sharding constraints.
    variables = random_variables(lm, tokens)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        logits = jax.jit(lm.apply)(variables, tokens)
    assert logits.shape == (4, 4, 64)


# ---------------------------------------------------------------- the ViT backbone
@pytest.mark.parametrize("placement", model.PLACEMENTS)
def test_vit_gives_pooled_features(placement):
    vit = model.vit(depth=2, width=32, num_heads=2, patch_size=4, norm_placement=placement)
    x = normal(2, 8, 8, 3)
    apply = jax.jit(functools.partial(vit.apply, train=True))
    features = apply(random_variables(vit, x, train=False), x)
    assert features.shape == (2, vit.feature_dim) and np.isfinite(features).all()


def test_vit_is_a_siamese_backbone():
    net = SiameseNet(backbone=model.vit(depth=1, width=32, num_heads=2, norm_type="rmsnorm"),
                     proj_hidden_dim=16, proj_out_dim=16, proj_layers=2, pred_hidden_dim=8)
    x = normal(4, 8, 8, 3)
    apply = functools.partial(net.apply, train=True, mutable=["batch_stats"])
    out, _ = jax.jit(apply)(random_variables(net, x, train=False), x)
    assert out["features"].shape == (4, 32) and out["p"].shape == (4, 16)
