"""Optimizers from the config: SGD with momentum, LARS and AdamW, warmup + cosine, weight-decay masks,
a fixed learning rate for the predictor (SimSiam), gradient clipping and gradient accumulation."""
import jax
import optax

OPTIMIZERS = ("sgd", "lars", "adamw")


def peak_learning_rate(opt_config, batch_size: int) -> float:
    """`lr` is given for `lr_batch_scale` examples (the linear scaling rule: lr x batch / 256)."""
    if opt_config.lr_batch_scale:
        return opt_config.lr * batch_size / opt_config.lr_batch_scale
    return opt_config.lr


def learning_rate_schedule(opt_config, batch_size: int, total_updates: int) -> optax.Schedule:
    peak = peak_learning_rate(opt_config, batch_size)
    if opt_config.warmup_steps >= total_updates:
        raise ValueError(f"config.optimizer.warmup_steps={opt_config.warmup_steps} must be smaller than the "
                         f"{total_updates} optimizer updates of the run; lower it or raise total_steps.")
    return optax.warmup_cosine_decay_schedule(0.0, peak, opt_config.warmup_steps, total_updates,
                                              end_value=peak * opt_config.final_lr_fraction)


def decay_mask(decay_bias_and_norm: bool):
    """Weight decay on every parameter, or (False) not on biases and norm gains: flax names them "bias" and
    "scale" (a name, not the number of dimensions: attention biases are [heads, head_dim])."""
    if decay_bias_and_norm:
        return None
    return lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) not in ("bias", "scale"), params)


def _base_optimizer(opt_config, learning_rate) -> optax.GradientTransformation:
    name, wd = opt_config.name, opt_config.weight_decay
    mask = decay_mask(opt_config.decay_bias_and_norm)
    if name == "sgd":
        # Weight decay added to the gradient before momentum, as torch.optim.SGD does (SimSiam's recipe).
        return optax.chain(optax.add_decayed_weights(wd, mask),
                           optax.sgd(learning_rate, momentum=opt_config.momentum))
    if name == "lars":
        # BYOL's recipe: biases and norms excluded from weight decay and from the trust-ratio adaptation.
        no_bias_norm = decay_mask(False)
        return optax.lars(learning_rate, weight_decay=wd, weight_decay_mask=mask or no_bias_norm,
                          trust_ratio_mask=no_bias_norm, momentum=opt_config.momentum)
    if name == "adamw":
        return optax.adamw(learning_rate, b1=opt_config.b1, b2=opt_config.b2, weight_decay=wd,
                           mask=mask if mask is not None else True)
    raise ValueError(f"config.optimizer.name={name!r} is unknown; choose one of {OPTIMIZERS}.")


def _predictor_label(params):
    """'fixed' for parameters under a module named 'predictor', 'default' elsewhere."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "fixed" if any(getattr(k, "key", None) == "predictor" for k in path) else "default",
        params)


def make_optimizer(opt_config, batch_size: int, total_steps: int):
    """Returns (optax transformation, learning-rate schedule over optimizer updates)."""
    accum = opt_config.grad_accum_steps
    if accum < 1 or total_steps % accum:
        raise ValueError(f"config.optimizer.grad_accum_steps={accum} must be >= 1 and divide "
                         f"total_steps={total_steps}.")
    # With accumulation the effective batch of one update is batch_size x accum.
    schedule = learning_rate_schedule(opt_config, batch_size * accum, total_steps // accum)
    tx = _base_optimizer(opt_config, schedule)
    if opt_config.fix_pred_lr:
        # SimSiam: the predictor keeps the peak learning rate while everything else follows the schedule.
        fixed = _base_optimizer(opt_config, peak_learning_rate(opt_config, batch_size * accum))
        tx = optax.multi_transform({"default": tx, "fixed": fixed}, _predictor_label)
    if opt_config.grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(opt_config.grad_clip_norm), tx)
    if accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accum)
    return tx, schedule
