"""BYOL with guided stop-gradient (GSG), or the BYOL baseline: configs/simsiam.py's recipes (same args:
gsg, dataset, predictor, batch, crops, backbone) with targets from an EMA copy of the encoder instead of
stop-gradient on the online projections.

    python -m launch.main --config=configs/byol.py --workdir=workdirs/gsg_byol            # offline default
    python -m launch.main --config=configs/byol.py:gsg=0 --workdir=workdirs/byol
    python -m launch.main --config=configs/byol.py:dataset=imagenet2012 --workdir=gs://BUCKET/byol_in1k

The EMA decay follows BYOL's cosine schedule from tau_base to 1 (`--config.byol.tau_schedule=cosine`); the
GSG authors used a constant 0.99, which is the default here (`tau_schedule=constant`, `tau_base=0.99`).
BYOL's own ImageNet recipe (LARS, batch 4096, wd 1.5e-6, 10-epoch warmup, projector 4096 -> 256) is
`--config.optimizer.name=lars` with those values; the recipes here keep SimSiam's SGD settings, as the GSG
paper compares the two methods under one optimizer. The predictor learning rate follows the schedule.
Add `--config.aug.blur_prob="(1.0, 0.1)" --config.aug.solarize_prob="(0.0, 0.2)"` for BYOL's asymmetric
augmentations (first view, second view).
"""
import ml_collections

from configs import simsiam


def get_config(arg=None):
    config = simsiam.get_config(arg)
    config.method = "byol"
    config.optimizer.fix_pred_lr = False
    config.byol = ml_collections.ConfigDict(dict(
        tau_base=0.99,
        tau_schedule="constant",   # constant (the GSG authors) | cosine (BYOL: tau_base -> 1)
    ))
    return config
