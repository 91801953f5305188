"""Encoders for SimSiam / BYOL: ResNet backbones (CIFAR and ImageNet stems), the SimSiam projector and
predictor MLPs.

Batch norm here is synchronised across devices (SyncBN, as in the SimSiam/BYOL recipes) by construction,
with no axis_name: under jax.jit the batch is one global array sharded over the mesh, so the jnp.mean over
the batch axis that gives the batch statistics reduces over every example, and XLA computes it across the
shards. An axis_name is only needed where a module sees one device's shard (pmap, shard_map); none runs so.

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


class ResidualBlock(nn.Module):
    """Fields and the shortcut shared by the ResNet blocks; subclasses give __call__ and `expansion`."""
    features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    zero_init_residual: bool = False

    def last_norm(self, name: str):
        # Zero gamma in the last BN makes the block start as its shortcut (Goyal et al.; SimSiam ImageNet).
        scale_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        return self.norm(scale_init=scale_init, name=name)

    def add_shortcut(self, x, y):
        if x.shape != y.shape:  # downsample / widen the shortcut: 1x1 conv + BN, as in torchvision
            x = self.conv(y.shape[-1], (1, 1), self.strides, padding=0, name="shortcut_conv")(x)
            x = self.norm(name="shortcut_bn")(x)
        return nn.relu(x + y)


class BasicBlock(ResidualBlock):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""
    expansion: ClassVar[int] = 1

    @nn.compact
    def __call__(self, x):
        # Explicit padding 1 (not "SAME") so stride-2 convs sample the same pixels as PyTorch's.
        y = self.conv(self.features, (3, 3), self.strides, padding=1, name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.features, (3, 3), 1, padding=1, name="conv2")(y)
        return self.add_shortcut(x, self.last_norm("bn2")(y))


class BottleneckBlock(ResidualBlock):
    """1x1 reduce, 3x3, 1x1 expand (x4) with a residual connection (ResNet-50/101/152). The stride is on the
    3x3 conv, as in torchvision's ResNet v1.5 (the original paper put it on the first 1x1 conv)."""
    expansion: ClassVar[int] = 4

    @nn.compact
    def __call__(self, x):
        y = self.conv(self.features, (1, 1), 1, padding=0, name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.features, (3, 3), self.strides, padding=1, name="conv2")(y)
        y = nn.relu(self.norm(name="bn2")(y))
        y = self.conv(self.features * self.expansion, (1, 1), 1, padding=0, name="conv3")(y)
        return self.add_shortcut(x, self.last_norm("bn3")(y))


class ResNet(nn.Module):
    """ResNet backbone; returns globally pooled features [B, feature_dim].

    stem="cifar": 3x3 stride-1 conv, no max-pool (small images); stem="imagenet": 7x7 stride-2 conv, then a
    3x3 stride-2 max-pool, as in torchvision.
    """
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    block_cls: ModuleDef = BasicBlock
    stem: str = "cifar"
    # Multiplier on every width (stem 64, stages 64-512, x4 out of bottlenecks), as in SimCLR's ResNet-50
    # (2x), not torchvision's wide_resnet50_2, which widens only the bottlenecks' inner convs.
    width: float = 1.0
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
        if self.stem not in ("cifar", "imagenet"):
            raise ValueError(f"ResNet stem={self.stem!r} is unknown; choose 'cifar' or 'imagenet'.")
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=_conv_init)
        norm = _batch_norm(train, self.dtype)
        imagenet = self.stem == "imagenet"
        kernel = 7 if imagenet else 3
        x = conv(self.stage_features(0), (kernel, kernel), 2 if imagenet else 1, padding=kernel // 2,
                 name="stem_conv")(x)
        x = nn.relu(norm(name="stem_bn")(x))
        if imagenet:  # padded with -inf, like PyTorch's MaxPool2d(3, 2, padding=1)
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for i, num_blocks in enumerate(self.stage_sizes):
            for j in range(num_blocks):
                x = self.block_cls(features=self.stage_features(i), strides=2 if i > 0 and j == 0 else 1,
                                   conv=conv, norm=norm, zero_init_residual=self.zero_init_residual,
                                   name=f"stage{i + 1}_block{j + 1}")(x)
        return jnp.mean(x, axis=(1, 2))


# Basic-block ResNets by depth; 10 is the tiny configs' version of 18 (same stages, one block each).
CIFAR_STAGE_SIZES = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}

# He et al. 2016, Table 1: block type and blocks per stage.
IMAGENET_ARCHS = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)),
                  50: (BottleneckBlock, (3, 4, 6, 3)), 101: (BottleneckBlock, (3, 4, 23, 3)),
                  152: (BottleneckBlock, (3, 8, 36, 3))}


def resnet_cifar(depth: int = 18, width: float = 1.0, dtype: Any = jnp.float32,
                 zero_init_residual: bool = False) -> ResNet:
    if depth not in CIFAR_STAGE_SIZES:
        raise ValueError(f"config.model.depth={depth} is not a CIFAR ResNet depth; choose one of "
                         f"{sorted(CIFAR_STAGE_SIZES)}.")
    return ResNet(stage_sizes=CIFAR_STAGE_SIZES[depth], block_cls=BasicBlock, width=width,
                  zero_init_residual=zero_init_residual, dtype=dtype)


def resnet_imagenet(depth: int = 50, width: float = 1.0, dtype: Any = jnp.float32,
                    zero_init_residual: bool = True) -> ResNet:
    """torchvision's ResNet (v1.5) without the fc head: 2048 x width features for depth >= 50, else 512 x
    width. zero_init_residual is on by default, as in the SimSiam and GSG ImageNet recipes."""
    if depth not in IMAGENET_ARCHS:
        raise ValueError(f"config.model.depth={depth} is not an ImageNet ResNet depth; choose one of "
                         f"{sorted(IMAGENET_ARCHS)}.")
    block_cls, stage_sizes = IMAGENET_ARCHS[depth]
    return ResNet(stage_sizes=stage_sizes, block_cls=block_cls, stem="imagenet", width=width,
                  zero_init_residual=zero_init_residual, dtype=dtype)


class MLP(nn.Module):
    """SimSiam projector: num_layers linear layers, BN after each (BN + ReLU on hidden layers, the last BN
    without affine parameters). Linear layers have no bias since a BN follows."""
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
    """SimSiam predictor: Linear(hidden, no bias) - BN - ReLU - Linear(out, with bias)."""
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
