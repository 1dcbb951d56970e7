"""FastGRNN: exact BPTT gradients, the documented loss, the same numbers on every namespace, clear errors."""

import warnings

import array_api_compat
import numpy as np
import pytest
from _namespaces import namespace_fixture

from hybrid_core import BackendError, BatchError, ConfigError, HybridConfig, HybridTrainer, Model
from hybrid_core._backend import from_numpy, to_numpy
from hybrid_core.models import FastGRNN
from hybrid_core.optim import Adam

xp = namespace_fixture()

D, H = 3, 5
KW = dict(w_rank=2, u_rank=3, l2=0.1, distill_alpha=0.3, temperature=2.0)


def _model(xp=np, seed=1, **kw):
    """A float64 FastGRNN whose parameters are moved off their tidy initial values (random ζ̂, ν̂, biases)."""
    model = FastGRNN(D, H, xp=xp, dtype=xp.float64, seed=seed, **{**KW, **kw})
    rng = np.random.default_rng(seed + 100)
    model.apply_update([from_numpy(xp, 0.5 * rng.normal(size=p.shape), dtype=xp.float64)
                        for p in model.parameters()], 1.0)
    return model


def _batch(xp=np, n=4, steps=6, teacher=True, seed=2):
    rng = np.random.default_rng(seed)
    out = (from_numpy(xp, rng.normal(size=(n, steps, D)), dtype=xp.float64),
           from_numpy(xp, rng.integers(0, 2, n)))
    return (*out, from_numpy(xp, 2.0 * rng.normal(size=n), dtype=xp.float64)) if teacher else out


def _numeric_gradient(model, batch, eps=1e-6):
    numeric = []
    params = model.parameters()
    for i, p in enumerate(params):
        grad = np.zeros(p.shape)
        for idx in np.ndindex(p.shape):
            bump = [np.zeros_like(q) for q in params]
            bump[i][idx] = 1.0
            model.apply_update(bump, eps)
            up = float(model.loss(batch))
            model.apply_update(bump, -2 * eps)
            down = float(model.loss(batch))
            model.apply_update(bump, eps)
            grad[idx] = (up - down) / (2 * eps)
        numeric.append(grad)
    return numeric


def _flat(arrays):
    return np.concatenate([np.ravel(to_numpy(a)) for a in arrays])


@pytest.mark.parametrize("teacher", [False, True], ids=["labels", "distillation"])
@pytest.mark.parametrize("l2", [0.0, 0.1])
def test_gradients_match_central_differences(teacher, l2):
    model = _model(l2=l2)
    batch = _batch(teacher=teacher)
    _, grads = model.loss_and_grad(batch)
    numeric = _numeric_gradient(model, batch)
    a, n = _flat(grads), _flat(numeric)
    assert np.linalg.norm(a - n) / np.linalg.norm(n) < 1e-6
    for g, m in zip(grads, numeric, strict=True):
        np.testing.assert_allclose(g, m, rtol=1e-5, atol=1e-8)


def _torch_loss(torch, params, x, y, teacher, alpha, temp, l2):
    """The documented formula written directly in torch, for autograd to differentiate."""
    w1, w2, u1, u2, bz, bh, zh, nh, v, c = params
    zeta, nu = torch.sigmoid(zh), torch.sigmoid(nh)
    h = torch.zeros(x.shape[0], v.shape[0], dtype=x.dtype)
    for t in range(x.shape[1]):
        a = x[:, t, :] @ w1 @ w2 + h @ u1 @ u2
        z = torch.sigmoid(a + bz)
        h = (zeta * (1 - z) + nu) * torch.tanh(a + bh) + z * h
    s = h @ v + c
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    loss = (1 - alpha) * bce(s, y) + alpha * temp**2 * bce(s / temp, torch.sigmoid(teacher / temp))
    return loss + 0.5 * l2 * sum((w * w).sum() for w in (w1, w2, u1, u2, v))


def test_gradients_match_torch_autograd_on_the_same_weights():
    torch = pytest.importorskip("torch", reason="torch is not installed: nothing to compare against")
    model = _model(seed=4)
    x, y, teacher = _batch(n=7, steps=9, seed=5)
    loss, grads = model.loss_and_grad((x, y, teacher))
    ref = [torch.tensor(p, requires_grad=True) for p in model.parameters()]
    ref_loss = _torch_loss(torch, ref, torch.tensor(x), torch.tensor(y, dtype=torch.float64),
                           torch.tensor(teacher), KW["distill_alpha"], KW["temperature"], KW["l2"])
    ref_loss.backward()
    assert float(loss) == pytest.approx(ref_loss.item(), rel=1e-12)
    for g, r in zip(grads, ref, strict=True):
        np.testing.assert_allclose(g, r.grad.numpy(), rtol=1e-9, atol=1e-12)


def test_loss_is_the_documented_formula():
    model = _model(l2=0.0, distill_alpha=0.25, temperature=3.0)
    x, y, t = _batch(n=6)
    s = model.logits(x)

    def bce(logit, p):
        prob = 1 / (1 + np.exp(-logit))
        return np.mean(-p * np.log(prob) - (1 - p) * np.log(1 - prob))

    hard = bce(s, y)
    soft = bce(s / 3.0, 1 / (1 + np.exp(-t / 3.0)))
    assert float(model.loss((x, y))) == pytest.approx(hard, rel=1e-12)
    assert float(model.loss((x, y, t))) == pytest.approx(0.75 * hard + 0.25 * 9.0 * soft, rel=1e-12)
    plain = _model(l2=0.0, distill_alpha=0.0)
    assert float(plain.loss((x, y, t))) == float(plain.loss((x, y)))
    decayed = _model(l2=0.4, distill_alpha=0.0)
    w = [decayed.parameters()[i] for i in (0, 1, 2, 3, 8)]
    penalty = 0.2 * sum(np.sum(a * a) for a in w)
    assert float(decayed.loss((x, y))) == pytest.approx(float(plain.loss((x, y))) + penalty, rel=1e-12)


def test_cell_follows_the_fastgrnn_recurrence():
    model = _model()
    x, _ = _batch(teacher=False)
    w1, w2, u1, u2, bz, bh, zh, nh, v, c = model.parameters()
    sig = lambda a: 1 / (1 + np.exp(-a))  # noqa: E731
    h = np.zeros((x.shape[0], H))
    for t in range(x.shape[1]):
        a = x[:, t] @ (w1 @ w2) + h @ (u1 @ u2)
        z = sig(a + bz)
        h = (sig(zh) * (1 - z) + sig(nh)) * np.tanh(a + bh) + z * h
    np.testing.assert_allclose(model.logits(x), h @ v + c, rtol=1e-12)


def test_every_namespace_agrees_with_numpy(xp):
    ref, model = _model(), _model(xp=xp)
    assert isinstance(model, Model)
    for p, r in zip(model.parameters(), ref.parameters(), strict=True):
        np.testing.assert_array_equal(to_numpy(p), r)
    batch, ref_batch = _batch(xp), _batch()
    ref_loss, ref_grads = ref.loss_and_grad(ref_batch)
    value, grads = model.loss_and_grad(batch)
    assert value.shape == () and array_api_compat.array_namespace(value) is xp
    np.testing.assert_allclose(to_numpy(value), ref_loss, rtol=1e-10)
    np.testing.assert_allclose(to_numpy(model.loss(batch)), ref_loss, rtol=1e-10)
    for g, r in zip(grads, ref_grads, strict=True):
        assert array_api_compat.array_namespace(g) is xp and g.dtype == xp.float64
        np.testing.assert_allclose(to_numpy(g), r, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(to_numpy(model.logits(batch[0])), ref.logits(ref_batch[0]), rtol=1e-10)
    assert float(to_numpy(model.accuracy(batch))) == float(ref.accuracy(ref_batch))


def test_default_dtype_float32_and_low_rank_shapes(xp):
    model = FastGRNN(6, 10, w_rank=2, u_rank=4, xp=xp)
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes == [(6, 2), (2, 10), (10, 4), (4, 10), (10,), (10,), (1,), (1,), (10,), (1,)]
    assert all(p.dtype == xp.float32 for p in model.parameters())
    rng = np.random.default_rng(0)
    x = from_numpy(xp, rng.normal(size=(3, 4, 6)), dtype=xp.float32)
    value, grads = model.loss_and_grad((x, from_numpy(xp, np.array([0, 1, 1]))))
    assert value.dtype == xp.float32 and all(g.dtype == xp.float32 for g in grads)
    full = FastGRNN(6, 10)
    assert full.settings["w_rank"] == 6 and full.settings["u_rank"] == 10


def test_loss_is_finite_for_huge_logits_without_warnings():
    model = _model(distill_alpha=0.5)
    x, y, t = _batch()
    shift = [np.zeros(p.shape) for p in model.parameters()]
    for sign in (1.0, -1.0):
        shift[9] = np.array([sign * 1e4])
        model.apply_update(shift, 1.0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            value, grads = model.loss_and_grad((x, y, t * 1e4))
        assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in grads)
        assert float(value) > 100  # half the labels are confidently wrong
        model.apply_update(shift, -1.0)


def test_float_and_bool_labels_give_the_same_loss():
    model = _model()
    x, y, t = _batch()
    ref = float(model.loss((x, y, t)))
    assert float(model.loss((x, y.astype(np.float64), t))) == ref
    assert float(model.loss((x, y.astype(bool), t))) == ref


def test_apply_update_rebinds_instead_of_writing():
    model = _model()
    before = model.parameters()
    copies = [p.copy() for p in before]
    model.apply_update([np.ones_like(p) for p in before], 0.5)
    for old, copy, new in zip(before, copies, model.parameters(), strict=True):
        np.testing.assert_array_equal(old, copy)
        np.testing.assert_allclose(new, copy + 0.5)


def test_constructor_lists_every_problem():
    with pytest.raises(ConfigError) as info:
        FastGRNN(0, 4, u_rank=-1, seed=-2, l2=-1.0, distill_alpha=1.5, temperature=0.0)
    text = str(info.value)
    for name in ("input_size", "u_rank", "seed", "l2", "distill_alpha", "temperature"):
        assert name in text
    assert len(info.value.problems) == 6
    with pytest.raises(ConfigError, match="u_rank"):
        FastGRNN(3, 4, u_rank=0)
    with pytest.raises(ConfigError, match="real floating"):
        FastGRNN(3, 4, dtype=np.int32)


def test_bad_batches_raise_batch_or_backend_errors():
    model = FastGRNN(D, H, dtype=np.float64)
    x, y, t = _batch()
    with pytest.raises(BatchError, match="teacher_logits"):
        model.loss(x)
    with pytest.raises(BatchError, match=r"\(n, T, 3\)"):
        model.loss((x[:, :, :2], y))
    with pytest.raises(BatchError, match="dtype"):
        model.loss((x.astype(np.float32), y))
    with pytest.raises(BatchError, match="labels"):
        model.loss((x, y[:2]))
    with pytest.raises(BatchError, match="teacher"):
        model.loss((x, y, t[:2]))
    with pytest.raises(BatchError, match="empty"):
        model.loss((x[:0], y[:0]))
    with pytest.raises(BackendError, match="not an array"):
        model.loss((x.tolist(), y))
    with pytest.raises(BatchError, match="shape"):
        model.apply_update([np.zeros((1,))] * 10, 1.0)


def test_trains_through_hybrid_trainer_on_a_memory_task():
    """The label is the sign of the first step's input: only a cell that remembers can learn it."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 6, 2))
    y = (x[:, 0, 0] > 0).astype(np.int64)
    model = FastGRNN(2, 8, dtype=np.float64, seed=0)
    trainer = HybridTrainer(model, Adam(model, lr=0.03),
                            HybridConfig(warmup_steps=20, min_full_steps=10, lr_recommend=False))
    before = float(model.loss((x, y)))
    trainer.fit(lambda step: (x[(step % 4) * 64:(step % 4 + 1) * 64], y[(step % 4) * 64:(step % 4 + 1) * 64]),
                steps=150, progress=False)
    assert float(model.loss((x, y))) < 0.5 * before
    assert float(model.accuracy((x, y))) > 0.9
