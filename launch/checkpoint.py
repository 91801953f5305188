"""Orbax checkpoints: train state, data-iterator position and config saved together, asynchronously,
atomically (orbax writes to a temporary directory and renames it when complete), keeping the last N."""
import os

import grain
import jax
import orbax.checkpoint as ocp


def make_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=True,
        # Leftovers of a save interrupted by a crash are incomplete by construction: drop them.
        cleanup_tmp_directories=True)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options,
                                 item_names=("state", "data", "config"))


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator, config) -> None:
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        config=ocp.args.JsonSave(config.to_dict())), force=True)


def restore_latest(manager: ocp.CheckpointManager, abstract_state, data_iterator):
    """Restores the newest checkpoint into arrays laid out as `abstract_state` (ShapeDtypeStructs with
    shardings) and moves `data_iterator` to its saved position. Returns (state, step, saved config dict),
    or None when the workdir has no checkpoint."""
    step = manager.latest_step()
    if step is None:
        return None
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(data_iterator),
            config=ocp.args.JsonRestore()))
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
