"""Train-step throughput of a config: examples/s, and achieved FLOP/s against this machine's measured
fp32 matmul FLOP/s (both measured in the same run).

    python -m benchmarks.step_throughput --config=configs/simsiam.py [--config.KEY=VALUE] [--steps=10]

FLOPs per step come from XLA's cost analysis of the compiled step (augmentation included). Prints one
JSON line with the results.
"""
import json
import platform
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from launch import mesh as mesh_lib, train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/simsiam.py", "Config to measure.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after one compile + one warm-up step).")


def matmul_flops_per_s(n=2048, repeats=5) -> float:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        f(a).block_until_ready()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def main(argv):
    del argv
    config = _CONFIG.value
    mesh = mesh_lib.make_mesh(config.mesh)
    task, state, _, train_step = train.build(config, mesh)
    batches = task.train_iterator()
    batch = mesh_lib.to_global_batch(next(batches), mesh)
    start = time.perf_counter()
    compiled = train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    flops = compiled.cost_analysis()["flops"]
    state, _, _ = train_step(state, batch)                     # warm-up
    jax.block_until_ready(state)
    local = [next(batches) for _ in range(_STEPS.value)]       # host input kept out of the timing
    start = time.perf_counter()
    for b in local:
        state, _, _ = train_step(state, mesh_lib.to_global_batch(b, mesh))
    jax.block_until_ready(state)
    step_s = (time.perf_counter() - start) / _STEPS.value
    peak = matmul_flops_per_s()
    print(json.dumps(dict(
        config=config.get("method", config.task), gsg=bool(config.get("gsg", {}).get("enabled", False)),
        batch_size=config.batch_size, image_size=config.get("aug", {}).get("image_size"),
        width=config.get("model", {}).get("width"), devices=jax.device_count(),
        platform=f"{jax.devices()[0].platform} {platform.processor() or platform.machine()}",
        compile_s=round(compile_s, 1), step_s=round(step_s, 3),
        examples_per_s=round(config.batch_size / step_s, 1),
        gflop_per_step=round(flops / 1e9, 2), achieved_gflop_per_s=round(flops / step_s / 1e9, 2),
        matmul_gflop_per_s=round(peak / 1e9, 1), fraction_of_matmul=round(flops / step_s / peak, 3))))


if __name__ == "__main__":
    app.run(main)
