"""Evaluation pieces: the kNN monitor (k=200, T=0.2 on L2-normalised backbone features) and the
collapse monitors z_std and effective_rank (GSG.md)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

# The batch axes of the mesh (launch/mesh.py): examples are split over both.
BATCH_AXES = ("data", "fsdp")


def l2_normalize(x, axis=-1, eps=1e-12):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


def z_std(z):
    """Per-channel std of z / ||z|| over the batch, averaged over channels: about 1/sqrt(d) when healthy,
    0 when every example maps to the same direction (collapse)."""
    return jnp.mean(jnp.std(l2_normalize(z.astype(jnp.float32)), axis=0))


def effective_rank(z):
    """Effective rank of a batch of projections z [N, D] (Roy & Vetterli 2007): exp of the Shannon entropy of
    the singular values normalised to sum 1. As in RankMe (Garrido et al. 2023), z is used as it is, neither
    centred nor L2-normalised, so a collapsed batch (all rows equal) has rank 1. RankMe adds 1e-7 to each
    normalised value against log(0); here 0 log 0 = 0 instead. Between 1 and min(N, D)."""
    s = jnp.linalg.svd(z.astype(jnp.float32), compute_uv=False)
    return jnp.exp(jnp.sum(jax.scipy.special.entr(s / jnp.sum(s))))


def embed_dataset(embed_fn, batches, mesh):
    """Runs `embed_fn` (uint8 images sharded over the batch axes -> replicated outputs) over process-local
    eval batches with masks; returns the concatenated outputs and labels of the real (unmasked) rows."""
    sharding = NamedSharding(mesh, P(BATCH_AXES))
    outputs, labels = [], []
    for batch in batches:
        out = embed_fn(jax.make_array_from_process_local_data(sharding, np.asarray(batch["image"])))
        # Rows of the global batch are the processes' local rows in process order.
        mask, label = (multihost_utils.process_allgather(batch[k], tiled=True) for k in ("mask", "label"))
        outputs.append([np.asarray(o)[mask] for o in out])
        labels.append(label[mask])
    return (*(np.concatenate(o) for o in zip(*outputs)), np.concatenate(labels))


@functools.partial(jax.jit, static_argnames=("num_classes", "k"))
def _knn_predict(queries, bank, bank_labels, num_classes, k, temperature):
    sims = queries @ bank.T                                         # cosine: both are L2-normalised
    top_sims, top_idx = jax.lax.top_k(sims, k)
    votes = jax.nn.one_hot(bank_labels[top_idx], num_classes) * jnp.exp(top_sims / temperature)[..., None]
    return jnp.argmax(votes.sum(axis=1), axis=-1)


def knn_top1(bank, bank_labels, queries, labels, num_classes, k=200, temperature=0.2, chunk=1000):
    """Weighted kNN classification (Wu et al. 2018, as in the SimSiam/GSG monitors): each query votes
    with its k most similar bank features, weighted by exp(sim / T). Returns top-1 accuracy in [0, 1]."""
    bank, bank_labels = jnp.asarray(bank), jnp.asarray(bank_labels)
    k = min(k, bank.shape[0])
    correct = 0
    for start in range(0, len(queries), chunk):
        pred = _knn_predict(jnp.asarray(queries[start:start + chunk]), bank, bank_labels,
                            num_classes=num_classes, k=k, temperature=temperature)
        correct += int(np.sum(np.asarray(pred) == labels[start:start + chunk]))
    return correct / len(queries)


def knn_evaluation(embed_split, spec, knn_config) -> dict:
    """The kNN monitor of a dataset: embed_split(split) -> (normalised features, ..., labels); the bank is
    the train split, the queries the eval split."""
    bank, _, bank_labels = embed_split(spec.train_split)
    queries, _, labels = embed_split(spec.eval_split)
    return {"knn_top1": knn_top1(bank, bank_labels, queries, labels, spec.num_classes, k=knn_config.k,
                                 temperature=knn_config.temperature)}
