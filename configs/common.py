"""Pieces every config shares: the standard keys of the training loop and the `key=value,...` arg parser."""
import ml_collections


def parse_arg(arg: str | None, **defaults):
    """'gsg=0,dataset=cifar10' -> ConfigDict with `defaults` updated; values keep the defaults' types.

    An unknown key or a value of the wrong type is an error naming the accepted keys."""
    result = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in defaults:
            raise ValueError(f"config arg {item!r} is not KEY=VALUE with KEY in {sorted(defaults)}.")
        kind = type(defaults[key])
        try:
            result[key] = kind(int(value)) if kind in (bool, int) else kind(value)
        except ValueError as e:
            raise ValueError(f"config arg {key}={value!r}: expected {kind.__name__}.") from e
    return result


def loop_config() -> ml_collections.ConfigDict:
    """The standard keys of launch/train.py, with defaults for a short local run."""
    return ml_collections.ConfigDict(dict(
        task="",
        seed=0,
        total_steps=1000,
        batch_size=256,
        log_every_steps=50,
        eval_every_steps=500,
        eval_at_start=True,       # evaluates the random initialisation at step 0: the baseline to beat
        checkpoint_every_steps=500,
        keep_checkpoints=3,
        evaluators=(),
        dry_run=False,            # build the train state abstractly, print its size per device, and stop
        # Mesh axes: data (replicated params), fsdp (sharded params), tensor (model parallel); -1 = rest.
        mesh=dict(data=-1, fsdp=1, tensor=1),
        # Logical axis name -> mesh axes, for models that annotate their parameters (flax logical axes).
        sharding_rules=(),
        compute_dtype="float32",
        optimizer=dict(
            name="sgd",            # sgd | lars | adamw
            lr=0.05,               # peak learning rate for lr_batch_scale examples
            lr_batch_scale=256,    # linear scaling rule: lr x batch_size / 256; 0 = lr as given
            warmup_steps=0,
            final_lr_fraction=0.0,
            momentum=0.9,
            b1=0.9,
            b2=0.95,
            weight_decay=1e-4,
            decay_bias_and_norm=True,
            fix_pred_lr=False,
            grad_clip_norm=0.0,    # 0 = no clipping
            grad_accum_steps=1,
        ),
    ))
