"""SimSiam with guided stop-gradient (GSG), or the SimSiam baseline; configs/byol.py builds on this file.

Args (comma separated): gsg (1 = GSG, 0 = the baseline), dataset (the recipe: fashion_mnist, cifar10,
cifar100, stl10, imagenet2012), predictor (1, or 0 for p = z), batch (0 = the recipe's batch size; other
values scale the learning rate linearly), crops (four_crop, the paper, or two_crop), backbone (resnet, the
recipe's ResNet, or vit: peri_ln's ViT with AdamW, see below).

Recipes, each one command (add `:gsg=0` for the baseline, `,predictor=0` for no predictor, `,batch=64` for a
small-batch run):
    python -m launch.main --config=configs/simsiam.py --workdir=workdirs/gsg_simsiam      # offline default
    python -m launch.main --config=configs/simsiam.py:dataset=cifar10 --workdir=workdirs/cifar10
    python -m launch.main --config=configs/simsiam.py:dataset=imagenet2012 --workdir=gs://BUCKET/in1k

- fashion_mnist (default): the offline job of this repository. CIFAR ResNet-18 at width 1/8 on crops of
  16 px, 800 steps of batch 128 (1.7 epochs), sized to finish within 10 minutes on a 2-core CPU (7.5-9),
  with kNN accuracy at step 0 (random initialisation) and at the end (README, Results: +2.1 to +3.0 points
  over seeds 0-2; at 300 steps the trained encoder did not reliably beat its initialisation).
- cifar10 / cifar100: SimSiam's CIFAR recipe. CIFAR ResNet-18, crops of 32 px, no blur, batch 512, SGD lr
  0.03 x batch / 256, wd 5e-4, 800 epochs, projector 2048-2048 (2 layers), predictor 2048-512-2048.
- stl10: ImageNet ResNet-18 on 96 px crops of train+unlabelled (105,000 images), batch 256, 200 epochs.
- imagenet2012: the GSG paper's setting. ResNet-50, MoCo-v2 augmentations on 224 px crops (random resized
  crop on the host, the rest on the device), batch 512, SGD lr 0.05 x batch / 256, wd 1e-4, 100 epochs,
  projector 2048-2048-2048, predictor 2048-512-2048, fixed predictor lr.

backbone=vit swaps the ResNet for peri_ln's ViT (the LM's Transformer block, no causal mask, pooled):
on fashion_mnist depth 4, width 64, 2 heads, 4 px patches (16 tokens); elsewhere ViT-S (depth 12, width
384, 6 heads) on 4, 8 or 16 px patches (CIFAR, STL-10, ImageNet), not run here. Norms default to Peri-LN;
`--config.model.norm_placement=pre` (or post, output) and `--config.model.norm_type=rmsnorm` switch them.
AdamW replaces SGD (details at config.optimizer below); projector, predictor and data stay the recipe's.
"""
import math

import ml_collections

from configs import common
from gsg_jax import augment, data

# dataset -> (train examples per epoch, epochs, batch size, base lr per 256, weight decay, crop px)
_RECIPES = {
    "fashion_mnist": (60_000, None, 128, 0.5, 5e-4, 16),
    "cifar10": (50_000, 800, 512, 0.03, 5e-4, 32),
    "cifar100": (50_000, 800, 512, 0.03, 5e-4, 32),
    "stl10": (105_000, 200, 256, 0.05, 5e-4, 96),
    "imagenet2012": (1_281_167, 100, 512, 0.05, 1e-4, 224),
}
# backbone=vit: dataset -> (depth, width = d_model, heads, patch px, AdamW base lr per 256)
_VIT_RECIPES = {
    "fashion_mnist": (4, 64, 2, 4, 1e-3),
    "cifar10": (12, 384, 6, 4, 5e-4),
    "cifar100": (12, 384, 6, 4, 5e-4),
    "stl10": (12, 384, 6, 8, 5e-4),
    "imagenet2012": (12, 384, 6, 16, 5e-4),
}
BACKBONES = ("resnet", "vit")


def get_config(arg=None):
    arg = common.parse_arg(arg, gsg=True, dataset="fashion_mnist", predictor=True, batch=0, crops="four_crop",
                           backbone="resnet")
    if arg.dataset not in _RECIPES:
        raise ValueError(f"config arg dataset={arg.dataset!r} has no recipe; choose one of {sorted(_RECIPES)}.")
    if arg.backbone not in BACKBONES:
        raise ValueError(f"config arg backbone={arg.backbone!r} is unknown; choose one of {BACKBONES}.")
    examples, epochs, recipe_batch, lr, weight_decay, image_size = _RECIPES[arg.dataset]
    config = common.loop_config()
    config.task = "gsg_jax"
    config.method = "simsiam"
    config.batch_size = arg.batch or recipe_batch
    if epochs is None:  # the offline default: a fixed short run
        config.total_steps, config.log_every_steps = 800, 50
        config.eval_every_steps, config.checkpoint_every_steps = 800, 200
    else:
        steps_per_epoch = math.ceil(examples / config.batch_size)
        config.total_steps = epochs * steps_per_epoch
        config.log_every_steps = 100
        config.eval_every_steps = config.checkpoint_every_steps = 10 * steps_per_epoch
    config.evaluators = ("knn", "z_std")  # z_std also reports the effective rank

    config.data = data.default_data_config()
    config.data.name = arg.dataset
    if arg.dataset == "stl10":
        config.data.train_split = "train+unlabelled"
    config.aug = augment.default_augment_config()
    config.aug.image_size = image_size
    config.aug.mean, config.aug.std = augment.DATASET_STATS[arg.dataset]
    if arg.dataset in ("fashion_mnist", "cifar10", "cifar100"):
        config.aug.blur_prob = (0.0, 0.0)   # SimSiam's CIFAR recipe has no blur; at 16 px it would erase the image

    small = arg.dataset != "imagenet2012"
    if arg.backbone == "resnet":
        cifar_stem = arg.dataset in ("fashion_mnist", "cifar10", "cifar100")
        backbone = dict(
            backbone="resnet_cifar" if cifar_stem else "resnet_imagenet",
            depth=18 if small else 50,
            width=0.125 if arg.dataset == "fashion_mnist" else 1.0,   # a multiplier on every ResNet width
            zero_init_residual=not small,  # ResNet-50 recipe: each block's last BN gamma starts at 0
        )
    else:
        depth, width, num_heads, patch_size, vit_lr = _VIT_RECIPES[arg.dataset]
        backbone = dict(
            backbone="vit", depth=depth, width=width, num_heads=num_heads, patch_size=patch_size,
            norm_placement="peri",   # peri | pre | post | output (peri_ln/model.py)
            norm_type="layernorm",   # layernorm | rmsnorm
        )
    config.model = ml_collections.ConfigDict(dict(
        **backbone,
        proj_hidden_dim=2048,
        proj_out_dim=2048,
        proj_layers=2 if small else 3,   # SimSiam: 2 layers on CIFAR, 3 on ImageNet
        pred_hidden_dim=512,
        predictor=arg.predictor,
    ))
    if arg.dataset == "fashion_mnist":  # smaller heads for the small CPU job
        config.model.update(dict(proj_hidden_dim=512, proj_out_dim=512, pred_hidden_dim=128))
    config.gsg = ml_collections.ConfigDict(dict(
        enabled=arg.gsg,
        rule="closest",          # closest (GSG) | farthest | random | symmetric
        partner="derangement",   # derangement (no self-pairs, global batch) | randperm (the authors' code)
        crops=arg.crops,         # four_crop (the paper: new crops of the partner) | two_crop (reuse its views)
    ))
    # SGD momentum 0.9, cosine to 0, the predictor's lr held fixed (SimSiam). The offline default uses a
    # larger lr than SimSiam's CIFAR 0.03 x batch / 256 since it trains for under two epochs.
    config.optimizer.update(dict(name="sgd", lr=lr, weight_decay=weight_decay, fix_pred_lr=True))
    if arg.backbone == "vit":
        # AdamW, as ViTs are trained (DeiT, DINO, MoCo v3), with DeiT's weight decay 0.05 (not on biases and
        # norm gains) and a warmup of 5% of the run (40 of the offline job's 800 steps; Adam's moments need
        # ~1 / (1 - b2) = 20 steps). lr: DINO's 5e-4 x batch / 256 for ViT-S, doubled for the tiny ViT, which
        # trains for under two epochs (as the ResNet's lr is raised); not tuned. The predictor's lr is fixed.
        config.optimizer.update(dict(name="adamw", lr=vit_lr, weight_decay=0.05, decay_bias_and_norm=False,
                                     warmup_steps=config.total_steps // 20))
    config.knn = ml_collections.ConfigDict(dict(k=200, temperature=0.2))
    config.eval_batch_size = 1000 if small else 500
    return config
