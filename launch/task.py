"""The interface between the shared training loop and a method package.

`config.task` names a package (e.g. "gsg_jax", "peri_ln") that exposes `make_task(config, mesh) -> Task`.
Method packages never import `launch`; they only have to provide these pure pieces.
"""
from typing import Any, Callable, Iterator, Mapping, Protocol

import flax.struct
import jax

PyTree = Any
Metrics = Mapping[str, jax.Array]


class Task(Protocol):
    def init(self, rng: jax.Array) -> tuple[PyTree, PyTree]:
        """Returns (params, model_state): trained parameters and everything else the model carries
        (batch statistics, EMA weights). Arrays may be nn.Partitioned boxes with logical axis names."""

    def loss(self, params: PyTree, model_state: PyTree, batch: PyTree,
             rng: jax.Array) -> tuple[jax.Array, tuple[PyTree, Metrics]]:
        """Pure, jit-compiled inside the train step: (scalar loss, (new model_state, metrics)). `batch` is
        the global batch sharded over the mesh's batch axes; `rng` is already folded with the step."""

    def train_iterator(self) -> Iterator[PyTree]:
        """Infinite iterator of process-local numpy batches, checkpointable (grain get_state/set_state)."""

    # Optional: after_update(params, model_state, num_updates) -> model_state, called inside the jitted
    # step after each optimizer update with the new parameters (e.g. an EMA target network).

    @property
    def evaluators(self) -> Mapping[str, Callable[[PyTree, PyTree], Mapping[str, float]]]:
        """Evaluator name -> fn(params, model_state) returning {metric name: value}."""


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: PyTree
    model_state: PyTree
    opt_state: PyTree
