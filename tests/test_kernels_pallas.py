"""Every Pallas kernel matches the reference with ``interpret=True`` on CPU (float32).

Each new input shape costs a Pallas compilation (about a second here), so the
inputs are a fixed set of edge cases instead of a hypothesis search.
"""

import numpy as np
import pytest
from _namespaces import available

from hybrid_core import BackendError
from hybrid_core.kernels import REGISTRY, reference, select

pytestmark = pytest.mark.skipif(not available("jax"), reason="jax does not import")

PALLAS = {op: next(k for k in impls if k.name == "pallas") for op, impls in REGISTRY.items()}
LISTS = {
    "odd-sizes": [(7,), (3, 5), (1031,)],
    "one-element": [(1,)],
    "scalar-empty-and-block-edges": [(), (0,), (1024,), (1025,)],
    "many-mixed": [(i * 13 % 97 + 1,) if i % 3 else (i % 4 + 1, i % 6 + 1) for i in range(30)],
    "empty-list": [],
}
GRUS = {"1x1x1x1": (1, 1, 1, 1), "odd": (3, 4, 5, 7), "no-steps": (2, 0, 3, 4), "wide": (2, 3, 17, 33)}


def kernel(op):
    """The Pallas implementation of ``op``, or a skip with the reason its declaration gives."""
    reason = PALLAS[op].rejection("jax", "cpu", "float32", forced=True)
    if reason:
        pytest.skip(f"pallas on jax/cpu: {reason}")
    return PALLAS[op].load()


def arrays(shape_list, seed, plant=False):
    """float32 NumPy arrays; with ``plant``, NaN, +inf and -inf in the larger ones."""
    rng = np.random.default_rng(seed)
    out = [np.asarray(rng.standard_normal(s) * 3, dtype=np.float32) for s in shape_list]
    if plant:
        for a, value in zip([a for a in out if a.size > 1], (np.nan, np.inf, -np.inf)):
            a.reshape(-1)[rng.integers(a.size)] = value
    return out


def on_jax(values):
    import jax.numpy as jnp

    return [jnp.asarray(v) for v in values]


# The expected values come from the reference on NumPy: eager JAX would compile every op for every shape.


@pytest.mark.parametrize("case", LISTS)
def test_pallas_axpy_matches_reference(case):
    params, direction = arrays(LISTS[case], 0), arrays(LISTS[case], 1)
    got = kernel("fused_axpy")(on_jax(params), on_jax(direction), -0.625)
    want = reference.fused_axpy(params, direction, -0.625)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("with_updates", [True, False], ids=["updates", "no-updates"])
@pytest.mark.parametrize("case", [*LISTS, "nonfinite"])
def test_pallas_stats_matches_reference(case, with_updates):
    import jax.numpy as jnp

    shape_list = LISTS["odd-sizes"] if case == "nonfinite" else LISTS[case]
    grads = arrays(shape_list, 2, plant=case == "nonfinite")
    updates = arrays(shape_list, 3) if with_updates else None
    loss = np.asarray(1.25, np.float32)
    got = kernel("fused_stats")(jnp.asarray(loss), on_jax(grads), None if updates is None else on_jax(updates))
    assert got.dtype == jnp.float32
    got = np.asarray(got, np.float64)
    want = np.asarray(reference.fused_stats(loss, grads, updates), np.float64)
    scale = np.nan_to_num(abs(want[1]) + abs(want[2]), posinf=0.0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale + 1e-6)
    assert got[5] == want[5]


@pytest.mark.parametrize("case", GRUS)
def test_pallas_gru_matches_reference(case):
    e, t, d, h = GRUS[case]
    rng = np.random.default_rng(4)
    args = [np.asarray(rng.standard_normal(s) * 0.5, dtype=np.float32)
            for s in [(e, d, 3 * h), (e, h, 3 * h), (e, 3 * h), (e, 3 * h), (e, h), (e, t, d)]]
    got = kernel("gru_ensemble_rollout")(*on_jax(args))
    assert got.shape == (e, t, h)
    np.testing.assert_allclose(np.asarray(got), reference.gru_ensemble_rollout(*args), rtol=1e-4, atol=1e-5)


def test_pallas_only_when_forced_on_cpu(monkeypatch):
    import jax.numpy as jnp

    monkeypatch.delenv("HYBRID_KERNELS", raising=False)
    cpu = jnp.zeros(1).device
    assert select("fused_axpy", jnp, cpu, jnp.float32).name == "jit"
    assert select("fused_axpy", jnp, cpu, jnp.float32, choice="pallas").name == "pallas"
    with pytest.raises(BackendError, match="dtype float64"):
        select("fused_axpy", jnp, cpu, "float64", choice="pallas")
