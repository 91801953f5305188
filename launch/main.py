"""Command line: python -m launch.main --config=configs/NAME.py:ARGS --workdir=DIR [--config.KEY=VALUE].

A rerun with the same --workdir resumes from its newest checkpoint. Several processes (multi-host pods,
SLURM, or local processes) are joined with jax.distributed.initialize when the environment or the
--coordinator_address flag says so.
"""
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from launch import metrics, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:ARGS]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.", required=True)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, to run several processes by hand.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --coordinator_address.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --coordinator_address.")


def _is_multi_process_environment() -> bool:
    env = os.environ
    return bool(env.get("JAX_COORDINATOR_ADDRESS")) or int(env.get("SLURM_NTASKS", "1")) > 1 or int(
        env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1 or "," in env.get("TPU_WORKER_HOSTNAMES", "")


def initialize_distributed():
    if _COORDINATOR.value:
        if jax.config.jax_platforms == "cpu" or os.environ.get("JAX_PLATFORMS") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    elif _is_multi_process_environment():
        jax.distributed.initialize()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config=configs/NAME.py[:ARGS] is required.")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)   # keep the console to progress lines; -v 0 for INFO
    if not jax.config.jax_compilation_cache_dir:
        # Reruns and resumes of the same config load compiled steps instead of compiling them again.
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/jax_compilation_cache"))
    initialize_distributed()
    logging.info("process %d/%d, devices: %s", jax.process_index(), jax.process_count(), jax.devices())
    try:
        train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (train.NonFiniteError, ValueError, RuntimeError, FileNotFoundError) as e:
        logging.exception("stopped")
        sys.exit(f"error: {e}")
    if jax.process_index() == 0:
        print("Evaluation (first -> last):\n" + metrics.eval_summary(_WORKDIR.value), flush=True)


if __name__ == "__main__":
    app.run(main)
