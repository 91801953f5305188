"""The one training loop shared by every method: mesh, sharded train state, jitted step, checkpoints,
metrics, evaluators. The method comes in through `config.task` (see task.py)."""
import importlib
import json
import signal
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from launch import checkpoint, mesh as mesh_lib, metrics as metrics_lib, optim
from launch.task import TrainState


class NonFiniteError(RuntimeError):
    """The loss or the gradients became NaN/Inf."""


def make_task(config, mesh):
    return importlib.import_module(config.task).make_task(config, mesh)


def _abstract_train_state(task, tx, rng):
    """(init function, boxed abstract train state): shapes and logical axes, nothing allocated."""
    def init(rng):
        params, model_state = task.init(rng)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                          opt_state=tx.init(params))

    return init, jax.eval_shape(init, rng)


def create_train_state(task, tx, rng, mesh, rules):
    """Builds the train state directly on its shardings: eval_shape finds shapes and logical axes without
    allocating anything, then a jitted init writes every array straight into its shards."""
    init, boxed = _abstract_train_state(task, tx, rng)
    shardings = mesh_lib.logical_shardings(boxed, mesh, rules)
    # Optimizer state made from boxed params mirrors their boxes; unboxing leaves plain arrays everywhere.
    state = jax.jit(lambda rng: nn.unbox(init(rng)), out_shardings=shardings)(rng)
    return state, shardings


def dry_run(config, mesh) -> dict:
    """Builds the train state abstractly on the configured mesh (nothing allocated); returns and prints
    the parameter count and the bytes of train state (params + optimizer state) each device holds."""
    task = make_task(config, mesh)
    tx, _ = optim.make_optimizer(config.optimizer, config.batch_size, config.total_steps)
    _, boxed = _abstract_train_state(task, tx, jax.random.key(config.seed))
    shardings = mesh_lib.logical_shardings(boxed, mesh, config.sharding_rules)
    abstract = nn.unbox(boxed)
    # Every device holds one shard of every array (a replicated array's shard is all of it).
    per_device = sum(int(np.prod(sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
                     for leaf, sharding in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)))
    n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract.params)))
    print(f"dry run: {n_params:,} parameters; train state {per_device / 2**30:.2f} GiB per device on the "
          f"mesh {dict(mesh.shape)}.", flush=True)
    return {"parameters": n_params, "train_state_bytes_per_device": per_device}


def make_train_step(task, tx, schedule, grad_accum_steps: int, step_key, state_shardings, mesh):
    def train_step(state: TrainState, batch):
        rng = jax.random.fold_in(step_key, state.step)
        grad_fn = jax.value_and_grad(task.loss, has_aux=True)
        (loss, (model_state, metrics)), grads = grad_fn(state.params, state.model_state, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if hasattr(task, "after_update"):  # e.g. BYOL's EMA target, once per optimizer update
            num_updates = (state.step + 1) // grad_accum_steps
            updated = task.after_update(params, model_state, num_updates)
            applied = (state.step + 1) % grad_accum_steps == 0  # with accumulation, not every step updates
            model_state = jax.tree.map(lambda new, old: jnp.where(applied, new, old), updated, model_state)
        grad_norm = optax.global_norm(grads)
        metrics = {**metrics, "loss": loss, "grad_norm": grad_norm,
                   "learning_rate": schedule(state.step // grad_accum_steps)}
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = state.replace(step=state.step + 1, params=params, model_state=model_state,
                                  opt_state=opt_state)
        return new_state, metrics, finite

    return jax.jit(train_step, donate_argnums=0,
                   in_shardings=(state_shardings, mesh_lib.batch_sharding(mesh)),
                   out_shardings=(state_shardings, mesh_lib.replicated(mesh), mesh_lib.replicated(mesh)))


class _Preemption:
    """SIGTERM (the usual preemption notice) sets a flag; the loop saves and exits cleanly. With several
    processes JAX's preemption sync service handles the signal and orbax tells every process the same step."""

    def __init__(self, manager):
        self.manager, self.flag = manager, False
        if jax.process_count() == 1:
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and exiting.")
        self.flag = True

    def reached(self, step: int) -> bool:
        return self.flag or (jax.process_count() > 1 and self.manager.reached_preemption(step))


def run_evaluators(evaluators, state, step: int, writer) -> dict:
    results = {}
    for name, evaluate in evaluators.items():
        start = time.perf_counter()
        values = dict(evaluate(state.params, state.model_state))
        logging.info("evaluator %s took %.1fs", name, time.perf_counter() - start)
        results.update(values)
    writer.write(step, results)
    if jax.process_index() == 0:
        print(f"eval step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()), flush=True)
    return results


def _check_finite(finite_flags, first_step, step, last_saved):
    if finite_flags and not bool(np.all(jax.device_get(finite_flags))):
        raise NonFiniteError(
            f"The loss or its gradients became NaN/Inf between steps {first_step} and {step}. The last good "
            f"checkpoint ({'step ' + str(last_saved) if last_saved is not None else 'none was saved'}) is "
            "untouched and a rerun resumes from it. Lower config.optimizer.lr, add warmup "
            "(config.optimizer.warmup_steps) or gradient clipping (config.optimizer.grad_clip_norm).")


def build(config, mesh):
    """Task, train state on its shardings, and the jitted train step for `config` on `mesh`."""
    mesh_lib.batch_size_per_shard(mesh, config.batch_size)
    task = make_task(config, mesh)
    tx, schedule = optim.make_optimizer(config.optimizer, config.batch_size, config.total_steps)
    init_key, step_key = jax.random.split(jax.random.key(config.seed))
    state, shardings = create_train_state(task, tx, init_key, mesh, config.sharding_rules)
    train_step = make_train_step(task, tx, schedule, config.optimizer.grad_accum_steps, step_key,
                                 shardings, mesh)
    return task, state, shardings, train_step


def select_evaluators(task, names, task_name: str) -> dict:
    """The task's evaluators called `names`, in that order."""
    unknown = set(names) - set(task.evaluators)
    if unknown:
        raise ValueError(f"Evaluators {sorted(unknown)} are not among those of {task_name}; choose from "
                         f"{sorted(task.evaluators)}.")
    return {name: task.evaluators[name] for name in names}


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains `config.task` for config.total_steps, resuming from workdir's checkpoints; returns the
    last evaluation results."""
    # ---------------------------------------------------------------- mesh, task, state, step
    mesh = mesh_lib.make_mesh(config.mesh)
    if config.dry_run:
        return dry_run(config, mesh)
    task, state, shardings, train_step = build(config, mesh)
    evaluators = select_evaluators(task, config.evaluators, config.task)
    # Each evaluator runs every eval_every_steps unless the task asks for its own interval.
    every = {name: getattr(task, "evaluator_every_steps", {}).get(name, config.eval_every_steps)
             for name in evaluators}

    # ---------------------------------------------------------------- resume
    data_iterator = task.train_iterator()
    manager = checkpoint.make_manager(workdir, config.keep_checkpoints)
    abstract = checkpoint.abstract_with_shardings(jax.eval_shape(lambda s: s, state), shardings)
    restored = checkpoint.restore_latest(manager, abstract, data_iterator)
    writer = metrics_lib.MetricWriter(workdir)
    if restored is None:
        first_step = 0
        last_saved = None
    else:
        state, first_step, saved_config = restored
        last_saved = first_step
        current = json.loads(config.to_json())
        changed = sorted(k for k in set(saved_config) | set(current) if saved_config.get(k) != current.get(k))
        if changed:
            logging.warning("Resuming with a config that differs from the checkpoint's in: %s", changed)
        print(f"Resumed from {workdir} at step {first_step}.", flush=True)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    print(f"{config.task}: {n_params:,} parameters on a mesh {dict(mesh.shape)}; "
          f"steps {first_step} -> {config.total_steps}.", flush=True)

    preemption = _Preemption(manager)
    progress = metrics_lib.Progress(first_step, config.total_steps)
    eval_results = {}
    if first_step == 0 and config.eval_at_start and evaluators:
        eval_results = run_evaluators(evaluators, state, 0, writer)

    # ---------------------------------------------------------------- the loop
    pending_metrics, finite_flags, interval_start = [], [], first_step
    step = first_step
    try:
        while step < config.total_steps:
            batch = mesh_lib.to_global_batch(next(data_iterator), mesh)
            state, step_metrics, finite = train_step(state, batch)
            step += 1
            pending_metrics.append(step_metrics)
            finite_flags.append(finite)

            is_last = step == config.total_steps
            preempted = preemption.reached(step)
            if step % config.log_every_steps == 0 or is_last or preempted:
                _check_finite(finite_flags, interval_start, step, last_saved)
                averaged = jax.tree.map(lambda *xs: np.mean(xs, axis=0), *jax.device_get(pending_metrics))
                averaged["steps_per_s"] = progress.report(step, averaged)
                writer.write(step, averaged)
                pending_metrics = []
            if step % config.checkpoint_every_steps == 0 or is_last or preempted:
                _check_finite(finite_flags, interval_start, step, last_saved)
                finite_flags, interval_start = [], step
                checkpoint.save(manager, step, state, data_iterator, config)
                last_saved = step
            if preempted:
                print(f"Preempted: saved step {step} to {workdir}; rerun the same command to resume.",
                      flush=True)
                return eval_results
            due = {name: fn for name, fn in evaluators.items() if step % every[name] == 0 or is_last}
            if due:
                eval_results = {**eval_results, **run_evaluators(due, state, step, writer)}
    finally:
        manager.wait_until_finished()
        manager.close()
        writer.close()
    return eval_results
