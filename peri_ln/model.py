"""Transformer blocks with a switch for where the norms go, the decoder-only LM and a ViT backbone.

With x the residual stream and F a sublayer (attention or MLP), `norm_placement` is one of
    post:   x <- Norm(x + F(x))                  (original Transformer)
    pre:    x <- x + F(Norm(x))                  (GPT-2 onwards)
    peri:   x <- x + Norm_out(F(Norm_in(x)))     (Peri-LN: the residual stream is never normalised)
    output: x <- x + Norm_out(F(x))              (OLMo 2's reordered norm; an ablation)
and Norm is LayerNorm (with bias) or RMSNorm (without), gains starting at 1. Norm parameter names say
where each norm sits: `norm_in` before F, `norm_out` after F, `norm_post` after the residual addition.

Parameters are float32 (`param_dtype`); `dtype` is the compute dtype. Every parameter carries flax
logical axis names ("vocab", "embed", "heads", "head_dim", "mlp", "patch", "norm"), which the config's
rule table maps onto mesh axes. Each block is its own submodule, `block_00`, `block_01`, ..., so
per-layer gradient norms can be read off the parameter tree.
"""
import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import spmd

ModuleDef = Any

PLACEMENTS = ("post", "pre", "peri", "output")
NORM_TYPES = ("layernorm", "rmsnorm")
MLP_TYPES = ("gelu", "swiglu")

# Architecture shapes by name. "tiny" fits a 2-core CPU (meant for the 256 byte vocabulary and a context of
# 256); the others are Llama-style shapes whose parameter counts with the paper's cl100k_base vocabulary
# (100,277 tokens, padded to 100,352), SwiGLU and tied embeddings are within 3% of their names
# (411M, 1.54B, 3.25B; see count_params).
SIZES = {
    "tiny": dict(d_model=128, num_layers=4, num_heads=4, mlp_dim=512),
    "400m": dict(d_model=1024, num_layers=24, num_heads=16, mlp_dim=2816),
    "1.5b": dict(d_model=2048, num_layers=26, num_heads=16, mlp_dim=5632),
    "3.2b": dict(d_model=3072, num_layers=26, num_heads=24, mlp_dim=8192),
}


def check_choice(field: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{field}={value!r} is unknown; choose one of {list(choices)}.")


def make_norm(norm_type: str, epsilon: float, dtype) -> ModuleDef:
    """LayerNorm (scale and bias) or RMSNorm (scale only) over the last axis; gains start at 1."""
    check_choice("norm_type", norm_type, NORM_TYPES)
    ones = nn.with_logical_partitioning(nn.initializers.ones, ("norm",))
    if norm_type == "layernorm":
        zeros = nn.with_logical_partitioning(nn.initializers.zeros, ("norm",))
        return functools.partial(nn.LayerNorm, epsilon=epsilon, dtype=dtype, scale_init=ones, bias_init=zeros)
    return functools.partial(nn.RMSNorm, epsilon=epsilon, dtype=dtype, scale_init=ones)


def normal_init(std: float):
    """N(0, std^2) drawn as one flat vector and reshaped: the same distribution, but XLA:CPU compiles
    multi-axis threefry draws several times slower."""
    def init(key, shape, dtype=jnp.float32):
        return (std * jax.random.normal(key, (math.prod(shape),), dtype)).reshape(shape)
    return init


def make_dense(use_bias: bool, init_std: float, dtype, param_dtype) -> Callable[..., nn.Module]:
    """dense(einsum_str, shape, names, name=...): an nn.Einsum whose kernel `shape` has the logical axis
    `names`, its bias the names of the kernel axes that reach the output. (DenseGeneral would draw a
    multi-axis kernel flat and reshape it, which breaks its axis names under nn.logical_axis_rules.)"""
    def dense(einsum_str: str, shape, names, *, name: str):
        kernel_axes, out_axes = einsum_str.split(",")[1].split("->")
        bias_names = tuple(n for axis, n in zip(kernel_axes, names) if axis in out_axes)
        return nn.Einsum(
            shape, einsum_str, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
            kernel_init=nn.with_logical_partitioning(normal_init(init_std), names),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, bias_names), name=name)
    return dense


def rope(x, base: float):
    """Rotary position embedding of x [B, T, N, H] (position = index along T), rotating the pairs
    (x[..., i], x[..., i + H/2]) by position * base^(-2i/H); computed in float32."""
    half = x.shape[-1] // 2
    inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = jnp.arange(x.shape[1], dtype=jnp.float32)[:, None] * inv_freq  # [T, H/2]
    sin, cos = jnp.sin(angles)[:, None, :], jnp.cos(angles)[:, None, :]  # broadcast over heads
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def constrain(x):
    # Shards the residual stream only under nn.logical_axis_rules (and a mesh) that name all three axes;
    # activation names differ from the parameters' so "embed" -> fsdp does not split activations' features.
    return nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"),
                                      fallback=spmd.RulesFallback.NO_CONSTRAINT)


class Attention(nn.Module):
    """Multi-head self-attention [B, T, d] -> [B, T, d]: optional QK-norm over head_dim, then RoPE (unless
    rope_base is None), softmax in float32 (jax.nn.dot_product_attention)."""
    num_heads: int
    head_dim: int
    dense: Callable[..., nn.Module]
    qk_norm: ModuleDef | None = None
    causal: bool = True
    rope_base: float | None = 10_000.0

    @nn.compact
    def __call__(self, x):
        shape, names = (x.shape[-1], self.num_heads, self.head_dim), ("embed", "heads", "head_dim")
        q, k, v = (self.dense("...d,dnh->...nh", shape, names, name=n)(x) for n in ("query", "key", "value"))
        if self.qk_norm is not None:
            q, k = self.qk_norm(name="query_norm")(q), self.qk_norm(name="key_norm")(k)
        if self.rope_base is not None:
            q, k = rope(q, self.rope_base), rope(k, self.rope_base)
        y = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal)
        out_shape, out_names = shape[1:] + shape[:1], names[1:] + names[:1]
        return self.dense("...nh,nhd->...d", out_shape, out_names, name="out")(y)


class Mlp(nn.Module):
    """d -> mlp_dim -> d with GELU (exact), or SwiGLU: down(silu(gate(x)) * up(x))."""
    mlp_dim: int
    dense: Callable[..., nn.Module]
    mlp_type: str = "swiglu"

    @nn.compact
    def __call__(self, x):
        check_choice("mlp_type", self.mlp_type, MLP_TYPES)
        shape, names = (x.shape[-1], self.mlp_dim), ("embed", "mlp")
        h = self.dense("...d,dm->...m", shape, names, name="up")(x)
        if self.mlp_type == "swiglu":
            h = nn.silu(self.dense("...d,dm->...m", shape, names, name="gate")(x)) * h
        else:
            h = nn.gelu(h, approximate=False)
        return self.dense("...m,md->...d", shape[::-1], names[::-1], name="down")(h)


class Residual(nn.Module):
    """One sublayer F on the residual stream, with its norms where norm_placement puts them."""
    sublayer: ModuleDef
    norm: ModuleDef
    norm_placement: str

    @nn.compact
    def __call__(self, x):
        check_choice("norm_placement", self.norm_placement, PLACEMENTS)
        sublayer = self.sublayer(name="sublayer")
        if self.norm_placement == "post":
            return self.norm(name="norm_post")(x + sublayer(x))
        h = self.norm(name="norm_in")(x) if self.norm_placement in ("pre", "peri") else x
        h = sublayer(h)
        return x + (self.norm(name="norm_out")(h) if self.norm_placement in ("peri", "output") else h)


class Block(nn.Module):
    """Transformer block: attention then MLP, each a Residual (parameters under `attn` and `mlp`)."""
    num_heads: int
    head_dim: int
    mlp_dim: int
    mlp_type: str = "swiglu"
    norm_placement: str = "peri"
    norm_type: str = "layernorm"
    norm_eps: float = 1e-5
    qk_norm: bool = False
    causal: bool = True
    rope_base: float | None = 10_000.0
    use_bias: bool = False
    init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        norm = make_norm(self.norm_type, self.norm_eps, self.dtype)
        dense = make_dense(self.use_bias, self.init_std, self.dtype, self.param_dtype)
        attn = functools.partial(Attention, num_heads=self.num_heads, head_dim=self.head_dim, dense=dense,
                                 qk_norm=norm if self.qk_norm else None, causal=self.causal,
                                 rope_base=self.rope_base)
        mlp = functools.partial(Mlp, mlp_dim=self.mlp_dim, dense=dense, mlp_type=self.mlp_type)
        x = Residual(attn, norm, self.norm_placement, name="attn")(x)
        return Residual(mlp, norm, self.norm_placement, name="mlp")(x)


class Transformer(nn.Module):
    """Fields and the block stack shared by TransformerLM and ViT; subclasses give __call__.

    embed_norm=None means on for peri only (Peri-LN normalises the input embeddings); final_norm=None
    means on unless post (whose residual stream already ends normalised).
    """
    num_layers: int = 4
    d_model: int = 128
    num_heads: int = 4
    head_dim: int | None = None  # None: d_model // num_heads
    mlp_dim: int = 512
    mlp_type: str = "swiglu"
    norm_placement: str = "peri"
    norm_type: str = "layernorm"
    norm_eps: float = 1e-5
    embed_norm: bool | None = None
    final_norm: bool | None = None
    qk_norm: bool = False
    use_bias: bool = False
    init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def norm(self, name: str) -> nn.Module:
        return make_norm(self.norm_type, self.norm_eps, self.dtype)(name=name)

    def block(self, i: int, causal: bool, rope_base: float | None) -> Block:
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}; "
                             "change one of them or set head_dim.")
        return Block(num_heads=self.num_heads, head_dim=self.head_dim or self.d_model // self.num_heads,
                     mlp_dim=self.mlp_dim, mlp_type=self.mlp_type, norm_placement=self.norm_placement,
                     norm_type=self.norm_type, norm_eps=self.norm_eps, qk_norm=self.qk_norm, causal=causal,
                     rope_base=rope_base, use_bias=self.use_bias, init_std=self.init_std, dtype=self.dtype,
                     param_dtype=self.param_dtype, name=f"block_{i:02d}")

    def encode(self, x, causal: bool, rope_base: float | None):
        """[B, T, d] embeddings -> (output [B, T, d], residual stream after each block [L, B, T, d])."""
        embed_norm = self.norm_placement == "peri" if self.embed_norm is None else self.embed_norm
        final_norm = self.norm_placement != "post" if self.final_norm is None else self.final_norm
        if embed_norm:
            x = self.norm("embed_norm")(x)
        x, hidden = constrain(x), []
        for i in range(self.num_layers):
            x = constrain(self.block(i, causal, rope_base)(x))
            hidden.append(x)
        if final_norm:
            x = self.norm("final_norm")(x)
        return x, jnp.stack(hidden)


class TransformerLM(Transformer):
    """Decoder-only LM: tokens int32 [B, T] -> logits float32 [B, T, vocab_size]; with return_hidden also
    the residual stream after every block, [num_layers, B, T, d_model] in the compute dtype."""
    vocab_size: int = 256
    tied_embeddings: bool = True
    rope_base: float = 10_000.0
    max_len: int = 256

    @nn.compact
    def __call__(self, tokens, return_hidden: bool = False):
        if tokens.shape[-1] > self.max_len:
            raise ValueError(f"sequence length {tokens.shape[-1]} exceeds max_len={self.max_len}.")
        embed = nn.Embed(self.vocab_size, self.d_model, dtype=self.dtype, param_dtype=self.param_dtype,
                         embedding_init=nn.with_logical_partitioning(normal_init(self.init_std),
                                                                     ("vocab", "embed")), name="embed")
        x, hidden = self.encode(embed(tokens), causal=True, rope_base=self.rope_base)
        if self.tied_embeddings:
            logits = embed.attend(x)
        else:
            head = make_dense(False, self.init_std, self.dtype, self.param_dtype)(
                "...d,dv->...v", (self.d_model, self.vocab_size), ("embed", "vocab"), name="head")
            logits = head(x)
        logits = logits.astype(jnp.float32)
        return (logits, hidden) if return_hidden else logits


def count_params(size_cfg: dict, vocab_size: int, **overrides) -> int:
    """Parameters of TransformerLM(vocab_size, **size_cfg, **overrides), from shapes alone (eval_shape)."""
    lm = TransformerLM(vocab_size=vocab_size, **size_cfg, **overrides)
    shapes = jax.eval_shape(lm.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    return sum(math.prod(p.shape) for p in jax.tree.leaves(nn.unbox(shapes)))


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0):
    """Fixed 2-D sin-cos position embeddings [h * w, width] (MoCo v3, big_vision)."""
    if width % 4:
        raise ValueError(f"ViT d_model={width} must be a multiple of 4 for 2-D sin-cos position embeddings.")
    y, x = jnp.mgrid[:h, :w]
    omega = 1.0 / temperature ** (jnp.arange(width // 4) / max(width // 4 - 1, 1))
    y, x = y.reshape(-1)[:, None] * omega, x.reshape(-1)[:, None] * omega
    return jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)


class ViT(Transformer):
    """Vision Transformer backbone: images [B, H, W, C] -> mean-pooled features [B, d_model]. Patches are
    embedded by one dense layer (a conv with stride = kernel = patch_size), with fixed 2-D sin-cos position
    embeddings, and attend without a causal mask or RoPE. Drop-in for gsg_jax's SiameseNet backbone."""
    patch_size: int = 4
    mlp_type: str = "gelu"
    norm_eps: float = 1e-6
    use_bias: bool = True

    @property
    def feature_dim(self) -> int:
        return self.d_model

    @nn.compact
    def __call__(self, x, train: bool):
        del train  # no dropout or batch norm; the argument matches the ResNet backbones
        b, h, w, c = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not divisible by the ViT patch_size={p}.")
        x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, p * p * c)
        dense = make_dense(self.use_bias, self.init_std, self.dtype, self.param_dtype)
        x = dense("...p,pd->...d", (p * p * c, self.d_model), ("patch", "embed"), name="patch_embed")(x)
        x = x + posemb_sincos_2d(h // p, w // p, self.d_model).astype(x.dtype)
        x, _ = self.encode(x, causal=False, rope_base=None)
        return jnp.mean(x, axis=1)


def vit(depth: int = 12, width: int = 384, dtype: Any = jnp.float32, patch_size: int = 4,
        num_heads: int | None = None, **kwargs) -> ViT:
    """ViT by depth and width (d_model), heads of 64 dims unless num_heads is given, MLP 4 x width; kwargs
    set the other ViT fields (norm_placement, norm_type, ...)."""
    width = int(width)
    return ViT(num_layers=depth, d_model=width, num_heads=num_heads or max(1, width // 64),
               mlp_dim=4 * width, patch_size=patch_size, dtype=dtype, **kwargs)
