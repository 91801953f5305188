"""Command line: python -m launch.main --config=configs/NAME.py:ARGS --workdir=DIR [--config.KEY=VALUE].

A rerun with the same --workdir resumes from its newest checkpoint. Several processes (multi-host pods,
SLURM, or local processes) are joined with jax.distributed.initialize when the environment or the
--coordinator_address flag says so.
"""
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from launch import metrics, runtime, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:ARGS]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.", required=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config=configs/NAME.py[:ARGS] is required.")
    runtime.setup()
    try:
        train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (train.NonFiniteError, ValueError, RuntimeError, FileNotFoundError) as e:
        logging.exception("stopped")
        sys.exit(f"error: {e}")
    if jax.process_index() == 0 and not _CONFIG.value.dry_run:
        print("Evaluation (first -> last):\n" + metrics.eval_summary(_WORKDIR.value), flush=True)


if __name__ == "__main__":
    app.run(main)
