"""Command line: python -m launch.evaluate --workdir=DIR [--evaluators=knn,z_std].

Runs evaluators on the latest checkpoint of a run, any method, without training: the task and its train
state are rebuilt from the config saved with the checkpoint. Prints the results and appends them to
DIR/metrics.jsonl (and TensorBoard) at the checkpoint's step. Creates and deletes no checkpoint, so it is
safe on the workdir of a run still training.
"""
import sys

import jax
import ml_collections
from absl import app, flags, logging

from launch import checkpoint, mesh as mesh_lib, metrics, runtime, train

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a run, with checkpoints.", required=True)
_EVALUATORS = flags.DEFINE_list("evaluators", None,
                                "Evaluators to run, comma separated (default: all of the run's task's).")


def restore_run(workdir: str):
    """(config, task, train state, step) of the latest checkpoint in workdir, rebuilt from the config
    saved with it."""
    manager = checkpoint.open_for_reading(workdir)
    try:
        saved = checkpoint.latest_config(manager)
        if saved is None:
            raise FileNotFoundError(f"No checkpoint in {manager.directory}: --workdir must be the workdir "
                                    "of a run (python -m launch.main ... --workdir=DIR) that saved one.")
        config = ml_collections.ConfigDict(saved[1])
        mesh = mesh_lib.make_mesh(config.mesh)
        task, state, shardings, _ = train.build(config, mesh)
        abstract = checkpoint.abstract_with_shardings(jax.eval_shape(lambda s: s, state), shardings)
        state, step, _ = checkpoint.restore_latest(manager, abstract)
    finally:
        manager.close()
    return config, task, state, step


def evaluate(workdir: str, evaluator_names=None) -> tuple[int, dict]:
    """Runs the named evaluators (default: all of the task's) on the latest checkpoint in workdir;
    returns (its step, the results)."""
    config, task, state, step = restore_run(workdir)
    names = task.evaluators if evaluator_names is None else evaluator_names
    evaluators = train.select_evaluators(task, names, config.task)
    writer = metrics.MetricWriter(workdir)
    try:
        return step, train.run_evaluators(evaluators, state, step, writer)
    finally:
        writer.close()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    runtime.setup()
    try:
        evaluate(_WORKDIR.value, _EVALUATORS.value)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        logging.exception("stopped")
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
