"""Encoders for SimSiam / BYOL: a CIFAR-style ResNet backbone, the SimSiam projector and predictor MLPs.

Batch norm everywhere here runs under jax.jit over a batch sharded across devices. No axis_name is needed:
the module sees the global (logical) batch and XLA computes its mean and variance across all shards, so
batch norm is synchronised across devices by construction (SyncBN, as in the SimSiam/BYOL recipes).

Parameters are float32; `dtype` is the compute dtype (bfloat16 on accelerators). BatchNorm reductions stay
in float32 (flax's force_float32_reductions). Initialisers follow PyTorch's ResNet (Kaiming normal,
fan_out, for convolutions), since the recipes being reproduced were tuned with it.
"""
import functools
import math
from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

ModuleDef = Any



def _conv_init(key, shape, dtype=jnp.float32):
    """Kaiming normal with fan_out (PyTorch's ResNet init), drawn as one flat vector and reshaped: the same
    distribution, but XLA:CPU compiles rank-4 threefry draws about 4x slower (25 s vs 7 s for 16 kernels)."""
    fan_out = math.prod(shape[:-2]) * shape[-1]
    return (jax.random.normal(key, (math.prod(shape),), dtype) * math.sqrt(2.0 / fan_out)).reshape(shape)


# PyTorch's nn.Linear default kernel init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_dense_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def _batch_norm(train: bool, dtype, **kwargs):
    # PyTorch's defaults: running stats updated with 0.1 of the batch statistics, eps 1e-5.
    return functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                             dtype=dtype, **kwargs)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""
    features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    zero_init_residual: bool = False
    expansion: ClassVar[int] = 1

    @nn.compact
    def __call__(self, x):
        # Explicit padding 1 (not "SAME") so stride-2 convs sample the same pixels as PyTorch's.
        y = self.conv(self.features, (3, 3), self.strides, padding=1, name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.features, (3, 3), 1, padding=1, name="conv2")(y)
        # Zero gamma in the last BN makes the block start as the identity (Goyal et al.; SimSiam ImageNet).
        scale_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        y = self.norm(scale_init=scale_init, name="bn2")(y)
        if x.shape != y.shape:  # downsample / widen the shortcut: 1x1 conv + BN, as in torchvision
            x = self.conv(self.features, (1, 1), self.strides, padding=0, name="shortcut_conv")(x)
            x = self.norm(name="shortcut_bn")(x)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stride-1 stem, no max-pool; returns globally pooled features [B, feature_dim].

    Batch norm is synchronised across devices by construction (see the module docstring): the batch it
    normalises over is the global batch under jit, with no axis_name.
    """
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    block_cls: ModuleDef = BasicBlock
    width: float = 1.0             # multiplier on the stage widths 64, 128, 256, 512
    base_features: int = 64
    zero_init_residual: bool = False
    dtype: Any = jnp.float32

    def stage_features(self, i: int) -> int:
        return int(round(self.base_features * 2 ** i * self.width))

    @property
    def feature_dim(self) -> int:
        return self.stage_features(len(self.stage_sizes) - 1) * self.block_cls.expansion

    @nn.compact
    def __call__(self, x, train: bool):
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=_conv_init)
        norm = _batch_norm(train, self.dtype)
        x = conv(self.stage_features(0), (3, 3), 1, padding=1, name="stem_conv")(x)
        x = nn.relu(norm(name="stem_bn")(x))
        for i, num_blocks in enumerate(self.stage_sizes):
            for j in range(num_blocks):
                x = self.block_cls(features=self.stage_features(i), strides=2 if i > 0 and j == 0 else 1,
                                   conv=conv, norm=norm, zero_init_residual=self.zero_init_residual,
                                   name=f"stage{i + 1}_block{j + 1}")(x)
        return jnp.mean(x, axis=(1, 2))


# Basic-block ResNets by depth; 10 is the tiny configs' version of 18 (same stages, one block each).
CIFAR_STAGE_SIZES = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


def resnet_cifar(depth: int = 18, width: float = 1.0, dtype: Any = jnp.float32,
                 zero_init_residual: bool = False) -> ResNet:
    if depth not in CIFAR_STAGE_SIZES:
        raise ValueError(f"config.model.depth={depth} is not a CIFAR ResNet depth; choose one of "
                         f"{sorted(CIFAR_STAGE_SIZES)}.")
    return ResNet(stage_sizes=CIFAR_STAGE_SIZES[depth], block_cls=BasicBlock, width=width,
                  zero_init_residual=zero_init_residual, dtype=dtype)


class MLP(nn.Module):
    """SimSiam projector: num_layers linear layers, BN after each (BN + ReLU on hidden layers, the last BN
    without affine parameters). Linear layers have no bias since a BN follows. BN is synchronised across
    devices by construction (see the module docstring)."""
    hidden_dim: int
    out_dim: int
    num_layers: int = 2
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        dense = functools.partial(nn.Dense, use_bias=False, dtype=self.dtype, kernel_init=_dense_init)
        norm = _batch_norm(train, self.dtype)
        for i in range(self.num_layers - 1):
            x = nn.relu(norm(name=f"bn{i + 1}")(dense(self.hidden_dim, name=f"fc{i + 1}")(x)))
        x = dense(self.out_dim, name=f"fc{self.num_layers}")(x)
        return norm(use_scale=False, use_bias=False, name=f"bn{self.num_layers}")(x)


class Predictor(nn.Module):
    """SimSiam predictor: Linear(hidden, no bias) - BN - ReLU - Linear(out, with bias). BN is synchronised
    across devices by construction (see the module docstring)."""
    hidden_dim: int
    out_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=_dense_init)
        x = dense(self.hidden_dim, use_bias=False, name="fc1")(x)
        x = nn.relu(_batch_norm(train, self.dtype)(name="bn1")(x))
        return dense(self.out_dim, name="fc2")(x)


class SiameseNet(nn.Module):
    """backbone -> projector (z) -> predictor (p). Parameter tree: {backbone, projector, predictor}; with
    use_predictor=False there is no predictor subtree and p is z. Outputs are float32 whatever `dtype` is,
    so losses run in float32. `encode` gives (features, z) only, for a BYOL EMA target or a kNN monitor.
    """
    backbone: nn.Module
    proj_hidden_dim: int = 2048
    proj_out_dim: int = 2048
    proj_layers: int = 3
    pred_hidden_dim: int = 512
    use_predictor: bool = True
    dtype: Any = jnp.float32

    def setup(self):
        self.projector = MLP(self.proj_hidden_dim, self.proj_out_dim, self.proj_layers, dtype=self.dtype)
        if self.use_predictor:
            self.predictor = Predictor(self.pred_hidden_dim, self.proj_out_dim, dtype=self.dtype)

    def encode(self, x, train: bool):
        features = self.backbone(x, train=train)
        return features.astype(jnp.float32), self.projector(features, train=train).astype(jnp.float32)

    def __call__(self, x, train: bool):
        features = self.backbone(x, train=train)
        z = self.projector(features, train=train)
        p = self.predictor(z, train=train) if self.use_predictor else z
        return {"features": features.astype(jnp.float32), "z": z.astype(jnp.float32),
                "p": p.astype(jnp.float32)}
