"""Orbax checkpoints: train state, data-iterator position and config saved together, asynchronously,
atomically (orbax writes to a temporary directory and renames it when complete), keeping the last N."""
import os

import grain
import jax
import orbax.checkpoint as ocp


def _directory(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=True,
        # Leftovers of a save interrupted by a crash are incomplete by construction: drop them.
        cleanup_tmp_directories=True)
    return ocp.CheckpointManager(_directory(workdir), options=options, item_names=("state", "data", "config"))


def open_for_reading(workdir: str) -> ocp.CheckpointManager:
    """A manager that creates and deletes nothing: safe on the workdir of a run still training (whose save
    in progress the cleanup of make_manager would delete)."""
    return ocp.CheckpointManager(_directory(workdir), options=ocp.CheckpointManagerOptions(create=False),
                                 item_names=("state", "data", "config"))


def latest_config(manager: ocp.CheckpointManager):
    """(latest step, the config dict saved with it), or None when there is no checkpoint."""
    step = manager.latest_step()
    if step is None:
        return None
    return step, manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator, config) -> None:
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        config=ocp.args.JsonSave(config.to_dict())), force=True)


def restore_latest(manager: ocp.CheckpointManager, abstract_state, data_iterator=None):
    """Restores the newest checkpoint into arrays laid out as `abstract_state` (ShapeDtypeStructs with
    shardings) and moves `data_iterator`, if given, to its saved position. Returns (state, step, saved
    config dict), or None when the workdir has no checkpoint."""
    step = manager.latest_step()
    if step is None:
        return None
    items = dict(state=ocp.args.StandardRestore(abstract_state), config=ocp.args.JsonRestore())
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax raises many types for unreadable or mismatched files
        path = os.path.join(str(manager.directory), str(step))
        raise RuntimeError(
            f"The checkpoint {path} cannot be restored ({type(e).__name__}: {e}). Nothing was changed or "
            "deleted. If it belongs to a different model or config, use a new --workdir; if it is damaged, "
            "move that step directory aside to resume from the previous checkpoint.") from e
    return restored.state, step, restored.config


def abstract_with_shardings(abstract_tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract_tree, shardings)
