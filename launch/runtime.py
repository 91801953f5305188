"""Process setup shared by the command-line entry points (launch.main, launch.evaluate): console logging,
the compilation cache, and jax.distributed when several processes run together (multi-host pods, SLURM,
or local processes started by hand with --coordinator_address)."""
import os

import jax
from absl import flags, logging

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


def setup():
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)   # keep the console to progress lines; -v 0 for INFO
    if not jax.config.jax_compilation_cache_dir:
        # Reruns and resumes of the same config load compiled steps instead of compiling them again.
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/jax_compilation_cache"))
    initialize_distributed()
    logging.info("process %d/%d, devices: %s", jax.process_index(), jax.process_count(), jax.devices())
