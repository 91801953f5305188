"""Guided stop-gradient (GSG) for SimSiam and BYOL, as a task of the shared training loop."""
from gsg_jax.task import make_task

__all__ = ["make_task"]
