"""SimSiam / BYOL loss and the guided stop-gradient (GSG) loss (see shared/design/GSG.md).

All functions are pure and jit-able; `rule`, `mode` and `batch_size` are static Python values.
Routing decisions are arrays of weights, never Python branches on traced values, so every rule
shares one code path. stop_gradient on targets is applied inside the losses, so callers may
pass live projections as targets.
"""
import jax
import jax.numpy as jnp

_EPS = 1e-12  # guards the norm of an all-zero vector (torch's F.normalize uses the same idea)

ROUTING_RULES = ('closest', 'farthest', 'random', 'symmetric')
PARTNER_MODES = ('derangement', 'randperm')


def _normalize(x):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), _EPS)


def neg_cosine(p, t):
    """Per-example D(p, t) = -cos(p, stop_gradient(t)); [B, D] x [B, D] -> [B]."""
    t = jax.lax.stop_gradient(t)
    return -jnp.sum(_normalize(p) * _normalize(t), axis=-1)


def simsiam_loss(p1, p2, t1, t2):
    """Symmetric SimSiam/BYOL loss L = 1/2 D(p1, t2) + 1/2 D(p2, t1), mean over the batch.

    Returns (loss, aux) with aux['cos'] the mean cosine similarity (= -loss).
    """
    per_example = 0.5 * neg_cosine(p1, t2) + 0.5 * neg_cosine(p2, t1)
    loss = jnp.mean(per_example)
    return loss, {'cos': -loss}


def route(distances, rule, key=None):
    """Maps target distances [B, 4] to routing weights [B, 4] (float32, rows sum to 1).

    Choice order: 0=(11,21), 1=(11,22), 2=(12,21), 3=(12,22).
    'closest': one-hot of argmin (ties -> first in order, as jnp.argmin); 'farthest': one-hot of
    argmax; 'random': one-hot of a uniform random choice per example (needs `key`);
    'symmetric': uniform 1/4 (the plain symmetric loss). `rule` is a static config string.
    """
    b, n = distances.shape
    if rule == 'closest':
        choice = jnp.argmin(distances, axis=-1)
    elif rule == 'farthest':
        choice = jnp.argmax(distances, axis=-1)
    elif rule == 'random':
        if key is None:
            raise ValueError("route(rule='random') needs a PRNG key")
        choice = jax.random.randint(key, (b,), 0, n)
    elif rule == 'symmetric':
        return jnp.full((b, n), 1.0 / n, jnp.float32)
    else:
        raise ValueError(f'unknown routing rule {rule!r}; expected one of {ROUTING_RULES}')
    return jax.nn.one_hot(choice, n, dtype=jnp.float32)


def gsg_loss(p11, p12, p21, p22, t11, t12, t21, t22, rule='closest', key=None):
    """Guided stop-gradient loss for image 1 (views 11, 12) and its partner image 2 (views 21, 22).

    The four cross-image Euclidean distances between the (stop-gradient) targets, in the order
    0=(11,21), 1=(11,22), 2=(12,21), 3=(12,22), are routed by `rule`. For the choice (1a, 2b) the
    sources p_1a and p_2b are pulled to their sibling targets t_1a', t_2b':
        L = -1/2 [cos(p_1a, t_1a') + cos(p_2b, t_2b')], mean over the batch.
    All rules share one code path: each of the four directional terms is weighted by the sum of
    the routing weights of the choices that use its source (p11->t12: w0+w1, p12->t11: w2+w3,
    p21->t22: w0+w2, p22->t21: w1+w3). With a one-hot rule the unchosen sources get weight 0 and
    so exactly zero gradient. With 'symmetric' (w = 1/4, every term weight 1/2) the loss equals
    the plain symmetric SimSiam/BYOL loss averaged over image 1 and image 2.

    Returns (loss, aux): aux['choice'] int32 [B] (the chosen pair; -1 for 'symmetric', where no
    single pair is chosen), aux['distances'] [B, 4], aux['cos'] the mean routed cosine (= -loss).
    """
    sg = jax.lax.stop_gradient
    t11, t12, t21, t22 = sg(t11), sg(t12), sg(t21), sg(t22)
    dist = lambda a, b: jnp.linalg.norm(a - b, axis=-1)
    distances = jnp.stack(
        [dist(t11, t21), dist(t11, t22), dist(t12, t21), dist(t12, t22)], axis=-1)
    w = route(distances, rule, key)  # routing weights carry no gradient: distances are of targets
    w_11 = w[:, 0] + w[:, 1]  # choices with source 11 (and target 12)
    w_12 = w[:, 2] + w[:, 3]
    w_21 = w[:, 0] + w[:, 2]
    w_22 = w[:, 1] + w[:, 3]
    per_example = 0.5 * (w_11 * neg_cosine(p11, t12) + w_12 * neg_cosine(p12, t11)
                         + w_21 * neg_cosine(p21, t22) + w_22 * neg_cosine(p22, t21))
    loss = jnp.mean(per_example)
    if rule == 'symmetric':
        choice = jnp.full(w.shape[:1], -1, jnp.int32)
    else:
        choice = jnp.argmax(w, axis=-1).astype(jnp.int32)
    return loss, {'choice': choice, 'distances': distances, 'cos': -loss}


def partner_permutation(key, batch_size, mode='derangement'):
    """Partner index r[i] for each example i of a batch; int32 [batch_size].

    'derangement' (default): r[i] != i for all i. Built from a random permutation p as one cycle,
    r[p[k]] = p[(k+1) % B]: uniform over the (B-1)! single-cycle permutations, not over all
    derangements. That is fine here: each example's partner is still uniform over the other B-1
    examples; only the joint structure of the pairing differs, which the per-example loss ignores.
    Needs batch_size >= 2.
    'randperm': jax.random.permutation (the GSG authors' behaviour; self-pairs allowed).
    """
    if mode == 'derangement':
        if batch_size < 2:
            raise ValueError(f'a derangement needs batch_size >= 2, got {batch_size}')
        p = jax.random.permutation(key, batch_size).astype(jnp.int32)
        return jnp.zeros_like(p).at[p].set(jnp.roll(p, -1))
    if mode == 'randperm':
        return jax.random.permutation(key, batch_size).astype(jnp.int32)
    raise ValueError(f'unknown partner mode {mode!r}; expected one of {PARTNER_MODES}')
