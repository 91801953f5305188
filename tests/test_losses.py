"""gsg_jax.losses against an independent per-example numpy reference (shared/design/GSG.md)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gsg_jax import losses

B, D = 16, 8
PAIRS = ((0, 0), (0, 1), (1, 0), (1, 1))  # choice k -> (a, b): views 1a and 2b, order of GSG.md


# ---------------------------------------------------------------- numpy reference (explicit loops)

def _cos(u, v):
    return float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))


def ref_simsiam(p1, p2, t1, t2):
    per = [-0.5 * _cos(p1[i], t2[i]) - 0.5 * _cos(p2[i], t1[i]) for i in range(len(p1))]
    return float(np.mean(per))


def ref_gsg(p, t, pick):
    """p, t: nested [[x11, x12], [x21, x22]]; pick(list of 4 distances) -> choice index."""
    losses_, choices = [], []
    for i in range(len(p[0][0])):
        d = [float(np.linalg.norm(t[0][a][i] - t[1][b][i])) for a, b in PAIRS]
        k = pick(d)
        a, b = PAIRS[k]
        # sources 1a, 2b; targets are their sibling views 1a', 2b'
        losses_.append(-0.5 * (_cos(p[0][a][i], t[0][1 - a][i]) + _cos(p[1][b][i], t[1][1 - b][i])))
        choices.append(k)
    return float(np.mean(losses_)), np.array(choices)


def _first_min(d):
    best = 0
    for k in range(1, 4):
        if d[k] < d[best]:
            best = k
    return best


def _first_max(d):
    best = 0
    for k in range(1, 4):
        if d[k] > d[best]:
            best = k
    return best


def _inputs(seed, b=B, d=D):
    xs = np.random.default_rng(seed).normal(size=(8, b, d)).astype(np.float32)
    p = [[xs[0], xs[1]], [xs[2], xs[3]]]
    t = [[xs[4], xs[5]], [xs[6], xs[7]]]
    return p, t


# Value tests go through jit, so they also check that gsg_loss jits with a static rule.
_gsg_jit = jax.jit(losses.gsg_loss, static_argnames='rule')


def _call(p, t, rule='closest', key=None):
    args = [jnp.asarray(x) for x in (p[0][0], p[0][1], p[1][0], p[1][1],
                                     t[0][0], t[0][1], t[1][0], t[1][1])]
    return _gsg_jit(*args, rule=rule, key=key)


# ---------------------------------------------------------------- SimSiam

def test_simsiam_value_and_stop_gradient():
    p, t = _inputs(0)
    p1, p2, t1, t2 = (jnp.asarray(x) for x in (p[0][0], p[0][1], t[0][0], t[0][1]))
    loss, aux = losses.simsiam_loss(p1, p2, t1, t2)
    np.testing.assert_allclose(loss, ref_simsiam(p[0][0], p[0][1], t[0][0], t[0][1]), rtol=1e-5)
    np.testing.assert_allclose(aux['cos'], -loss, rtol=1e-6)
    grads = jax.grad(lambda *a: losses.simsiam_loss(*a)[0], argnums=(0, 1, 2, 3))(p1, p2, t1, t2)
    assert np.all(np.abs(grads[0]).sum(-1) > 0) and np.all(np.abs(grads[1]).sum(-1) > 0)
    assert np.all(grads[2] == 0) and np.all(grads[3] == 0)


# ---------------------------------------------------------------- GSG, closest

@pytest.mark.parametrize("rule, pick, seed", [("closest", _first_min, 1), ("farthest", _first_max, 3)])
def test_gsg_one_hot_rule_matches_reference(rule, pick, seed):
    p, t = _inputs(seed)
    loss, aux = _call(p, t, rule)
    ref_loss, ref_choice = ref_gsg(p, t, pick)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_array_equal(aux['choice'], ref_choice)
    assert aux['choice'].dtype == jnp.int32 and aux['distances'].shape == (B, 4)
    assert len(set(ref_choice.tolist())) > 1  # the test exercises several choices

    args = [jnp.asarray(x) for x in (p[0][0], p[0][1], p[1][0], p[1][1],
                                     t[0][0], t[0][1], t[1][0], t[1][1])]
    grads = jax.grad(lambda *a: losses.gsg_loss(*a, rule=rule)[0], argnums=tuple(range(8)))(*args)
    for i, k in enumerate(ref_choice):
        a, b = PAIRS[k]
        chosen = {(0, a), (1, b)}  # (image, view) of the two sources
        for img in (0, 1):
            for view in (0, 1):
                row = np.asarray(grads[2 * img + view][i])
                if (img, view) in chosen:
                    assert np.abs(row).sum() > 0
                else:
                    assert np.all(row == 0)
    for g in grads[4:]:
        assert np.all(np.asarray(g) == 0)


def test_gsg_closest_ties_go_to_first_pair():
    p, t = _inputs(2)
    # t21 == t22: d(11,21) == d(11,22) and d(12,21) == d(12,22) -> only choices 0 or 2
    t_eq = [[t[0][0], t[0][1]], [t[1][0], t[1][0].copy()]]
    _, aux = _call(p, t_eq, 'closest')
    np.testing.assert_array_equal(aux['choice'], ref_gsg(p, t_eq, _first_min)[1])
    assert set(np.asarray(aux['choice']).tolist()) <= {0, 2}
    # all four targets equal: every distance is 0 -> choice 0
    same = [[t[0][0], t[0][0]], [t[0][0], t[0][0]]]
    _, aux = _call(p, same, 'closest')
    np.testing.assert_array_equal(aux['choice'], np.zeros(B, np.int32))
    # zero distances must not leak NaNs into the gradient (the distance norm is never differentiated)
    args = [jnp.asarray(x) for x in (*p[0], *p[1], *same[0], *same[1])]
    grads = jax.grad(lambda *a: losses.gsg_loss(*a, rule="closest")[0], argnums=tuple(range(8)))(*args)
    assert all(np.all(np.isfinite(g)) for g in grads)
    # t11 == t12: d(11,2b) == d(12,2b) -> only choices 0 or 1
    t_eq1 = [[t[0][0], t[0][0].copy()], [t[1][0], t[1][1]]]
    _, aux = _call(p, t_eq1, 'closest')
    assert set(np.asarray(aux['choice']).tolist()) <= {0, 1}


# ---------------------------------------------------------------- other rules

def test_gsg_random():
    p, t = _inputs(4, b=4000, d=4)
    key = jax.random.key(0)
    loss, aux = _call(p, t, 'random', key)
    choice = np.asarray(aux['choice'])
    assert choice.min() >= 0 and choice.max() <= 3
    counts = np.bincount(choice, minlength=4) / len(choice)
    np.testing.assert_allclose(counts, 0.25, atol=0.03)
    # loss is the reference loss for the choice actually made
    made = iter(choice.tolist())
    ref_loss, _ = ref_gsg(p, t, lambda d: next(made))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-4)
    # deterministic given the key, different for another key
    np.testing.assert_array_equal(_call(p, t, 'random', key)[1]['choice'], choice)
    assert np.any(np.asarray(_call(p, t, 'random', jax.random.key(1))[1]['choice']) != choice)
    with pytest.raises(ValueError):
        _call(p, t, 'random', None)


def test_gsg_symmetric_is_simsiam_averaged_over_images():
    p, t = _inputs(5)
    loss, aux = _call(p, t, 'symmetric')
    ref = 0.5 * (ref_simsiam(p[0][0], p[0][1], t[0][0], t[0][1])
                 + ref_simsiam(p[1][0], p[1][1], t[1][0], t[1][1]))
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    np.testing.assert_array_equal(aux['choice'], -np.ones(B, np.int32))


def test_route_weights():
    d = jnp.array([[3., 1., 1., 2.], [0., 0., 0., 0.], [1., 4., 4., 2.]])
    np.testing.assert_array_equal(losses.route(d, 'closest'), np.eye(4)[[1, 0, 0]])
    np.testing.assert_array_equal(losses.route(d, 'farthest'), np.eye(4)[[0, 0, 1]])
    np.testing.assert_array_equal(losses.route(d, 'symmetric'), np.full((3, 4), 0.25))
    w = losses.route(d, 'random', jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(w).sum(-1), 1.0)
    with pytest.raises(ValueError, match='closest'):
        losses.route(d, 'nearest')


def test_jit_eager_agree_and_unknown_rule():
    p, t = _inputs(6)
    args = [jnp.asarray(x) for x in (p[0][0], p[0][1], p[1][0], p[1][1],
                                     t[0][0], t[0][1], t[1][0], t[1][1])]
    jl, jaux = _call(p, t, 'closest')
    el, eaux = losses.gsg_loss(*args)
    np.testing.assert_allclose(jl, el, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(jaux['choice'], eaux['choice'])
    jl, _ = jax.jit(losses.simsiam_loss)(*args[:2], *args[4:6])
    np.testing.assert_allclose(jl, losses.simsiam_loss(*args[:2], *args[4:6])[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match='symmetric'):
        losses.gsg_loss(*args, rule='bogus')
    with pytest.raises(ValueError, match='closest'):
        _call(p, t, 'bogus')


# ---------------------------------------------------------------- partner permutation

def _is_permutation(perms):
    n = perms.shape[-1]
    return np.array_equal(np.sort(perms, axis=-1), np.broadcast_to(np.arange(n), perms.shape))


# Each batch size is a separate compile (~1 s of CPU), so a spread of sizes over 2..300 is tested,
# each for many keys at once (lax.map: vmapping threefry over keys compiles ~3x slower).
@pytest.mark.parametrize('n', [2, 3, 5, 300])
def test_derangement(n):
    keys = jax.random.split(jax.random.key(n), 2000)
    perms = np.asarray(jax.jit(lambda ks: jax.lax.map(
        lambda k: losses.partner_permutation(k, n), ks))(keys))
    assert perms.dtype == np.int32 and perms.shape == (2000, n)
    assert _is_permutation(perms)
    assert not np.any(perms == np.arange(n))  # no fixed points, for every key
    # a single n-cycle: following partners from any start returns to it after exactly n steps
    rows, cur = np.arange(len(perms)), np.zeros(len(perms), np.int64)
    for step in range(1, n + 1):
        cur = perms[rows, cur]
        assert np.all(cur == 0) if step == n else not np.any(cur == 0)
    # differs across keys: all (n-1)! cycles appear for small n, mostly distinct for larger n
    n_distinct = len({tuple(r) for r in perms.tolist()})
    if n <= 5:
        assert n_distinct == np.prod(np.arange(1, n))
    else:
        assert n_distinct > 1000
    if n == 5:  # each example's partner is uniform over the other n-1 examples
        freq = np.stack([np.bincount(perms[:, i], minlength=n) for i in range(n)]) / len(keys)
        np.testing.assert_allclose(freq, (1 - np.eye(n)) / (n - 1), atol=0.04)


def test_randperm_and_errors():
    for n in (1, 300):
        r = np.asarray(jax.jit(losses.partner_permutation, static_argnums=(1, 2))(
            jax.random.key(n), n, 'randperm'))
        assert r.dtype == np.int32 and _is_permutation(r)
    with pytest.raises(ValueError):
        losses.partner_permutation(jax.random.key(0), 1)
    with pytest.raises(ValueError):
        losses.partner_permutation(jax.random.key(0), 8, 'shuffle')
