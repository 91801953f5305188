"""Linear probe of a pretraining run: a linear classifier on its frozen backbone (batch norm in inference
mode), trained with the labels of the same dataset and evaluated on its test split (linear_top1).

    python -m launch.main --config=configs/linear_eval.py:checkpoint=/tmp/gsg_simsiam --workdir=/tmp/lin

Arg checkpoint=WORKDIR (required): the pretraining run's --workdir. Its latest checkpoint gives the backbone;
the config saved with it gives the model, the dataset, the image size and the normalisation.
Training augmentation is the standard linear-evaluation one: random resized crops and flips, nothing else.
SGD with momentum, no weight decay, cosine decay, as in the SimSiam/MoCo linear protocols (LARS with
--config.optimizer.name=lars). The default, 2 epochs of Fashion-MNIST at batch 256, takes about N minutes
on a 2-core CPU.
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
    config.total_steps = 468            # 2 epochs of the 60,000 Fashion-MNIST training images
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
    # Mild crops (CIFAR-style, mostly shifts) and flips: at 2 epochs ImageNet's scale (0.08, 1) gave 0.58
    # against 0.66 for (0.8, 1) (SimSiam pretrained for 100 steps; whole images at test time).
    config.aug.crop_scale = (0.8, 1.0)
    config.aug.update(dict(color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=(0.0, 0.0),
                           solarize_prob=(0.0, 0.0)))

    # lr 0.3-3 x batch/256 all gave 0.62 +- 0.01 (scale (0.5, 1)), 0.1 less.
    config.optimizer.update(dict(name="sgd", lr=1.0, weight_decay=0.0))
    config.knn = ml_collections.ConfigDict(dict(k=200, temperature=0.2))
    config.eval_batch_size = 1000
    return config
