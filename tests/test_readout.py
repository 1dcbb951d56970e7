"""The read-out of averaged weights: what it averages, how it is swapped in and out, and that it persists."""

import math

import numpy as np
import pytest
from _namespaces import available
from hypothesis import given, settings
from hypothesis import strategies as st

from hybrid_core import ConfigError, HybridConfig, HybridTrainer, ModelError
from hybrid_core._readout import ReadOut
from hybrid_core.models import MLP
from hybrid_core.optim import Adam

# Never predicts, so every step is a real one and the snapshots follow plain Adam training.
PLAIN = dict(horizon_arms=(0,), lr_recommend=False, warmup_steps=10)


def _data(seed=0, n=96):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6))
    return x, (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0).astype(np.int64)


def _batch(x, y, i):
    idx = np.random.default_rng(i).choice(len(y), 16, replace=False)
    return x[idx], y[idx]


def _trainer(seed=0, **changes):
    model = MLP([6, 5, 3], dtype=np.float64, seed=seed)
    return HybridTrainer(model, Adam(model, lr=0.05), HybridConfig(**{**PLAIN, **changes})), model


def _plain_snapshots(steps, spacing, seed=0):
    """The weights after every ``spacing``-th step of the same training without the trainer."""
    x, y = _data()
    model = MLP([6, 5, 3], dtype=np.float64, seed=seed)
    opt = Adam(model, lr=0.05)
    out = []
    for i in range(steps):
        _, grads = model.loss_and_grad(_batch(x, y, i))
        opt.step(grads)
        if (i + 1) % spacing == 0:
            out.append([p.copy() for p in model.parameters()])
    return out


@settings(max_examples=12, deadline=None)
@given(steps=st.integers(10, 90), count=st.integers(1, 6), spacing=st.integers(1, 12),
       decay=st.floats(0.5, 0.99))
def test_lawa_and_ema_are_the_averages_of_the_snapshots_of_plain_training(steps, count, spacing, decay):
    x, y = _data()
    trainer, _ = _trainer(lawa_snapshots=count, readout_spacing=spacing, ema_decay=decay, readout_check_every=0)
    for i in range(steps):
        trainer.step(_batch(x, y, i))
    trainer.flush()
    snaps = _plain_snapshots(steps, spacing)
    if not snaps:
        assert not trainer.readout.available("lawa")
        return
    window = snaps[-count:]
    for got, *each in zip(trainer.export_parameters("lawa"), *window):
        np.testing.assert_allclose(got, sum(each) / len(each), rtol=1e-12, atol=1e-12)
    # Bias-corrected EMA: weights (1 − decay^spacing)·decay^(spacing·age), divided by their sum.
    weights = [(1 - decay ** spacing) * decay ** (spacing * (len(snaps) - 1 - j)) for j in range(len(snaps))]
    for got, *each in zip(trainer.export_parameters("ema"), *snaps):
        np.testing.assert_allclose(got, sum(w * s for w, s in zip(weights, each)) / sum(weights), rtol=1e-10)


@pytest.mark.parametrize("backend", ["numpy", *(pytest.param(b, marks=pytest.mark.skipif(
    not available(b), reason=f"{b} is not installed")) for b in ("torch", "jax"))])
def test_evaluation_parameters_swaps_the_read_out_in_and_puts_the_raw_weights_back_bit_for_bit(backend):
    model, batch = _backend_model(backend)
    trainer = HybridTrainer(model, _backend_optimizer(backend, model), HybridConfig(**PLAIN))
    for i in range(40):
        trainer.step(batch(i))
    trainer.flush()
    raw = [np.asarray(_host(p)).copy() for p in model.parameters()]
    lawa = [np.asarray(_host(p)) for p in trainer.export_parameters("lawa")]
    assert any(not np.array_equal(a, b) for a, b in zip(raw, lawa))
    with trainer.evaluation_parameters("lawa") as name:
        assert name == "lawa"
        for p, want in zip(model.parameters(), lawa):
            np.testing.assert_array_equal(_host(p), want)
    for p, want in zip(model.parameters(), raw):
        np.testing.assert_array_equal(_host(p), want)
    with pytest.raises(RuntimeError, match="boom"), trainer.evaluation_parameters("ema"):
        raise RuntimeError("boom")
    for p, want in zip(model.parameters(), raw):
        np.testing.assert_array_equal(_host(p), want)
    # Training continues from the raw weights: the next step is the one a trainer never swapped takes.
    twin_model, _ = _backend_model(backend)
    twin = HybridTrainer(twin_model, _backend_optimizer(backend, twin_model), HybridConfig(**PLAIN))
    for i in range(41):
        twin.step(batch(i))
    trainer.step(batch(40))
    trainer.flush(), twin.flush()
    for a, b in zip(model.parameters(), twin_model.parameters()):
        np.testing.assert_array_equal(_host(a), _host(b))


def test_unknown_unkept_or_unavailable_read_outs_are_config_errors():
    trainer, _ = _trainer(readout=("lawa",))
    with pytest.raises(ConfigError, match="not available yet"), trainer.evaluation_parameters("lawa"):
        pass
    with pytest.raises(ConfigError, match="not kept"), trainer.evaluation_parameters("ema"):
        pass
    with pytest.raises(ConfigError, match="must be 'raw'"), trainer.evaluation_parameters("swa"):
        pass
    with trainer.evaluation_parameters() as name:  # nothing compared yet: the raw weights
        assert name == "raw"


def test_a_model_without_set_parameters_cannot_swap_a_read_out_in():
    class NoSet:
        def __init__(self):
            self.inner = MLP([6, 5, 3], dtype=np.float64, seed=0)

        def parameters(self):
            return self.inner.parameters()

        def loss(self, batch):
            return self.inner.loss(batch)

        def loss_and_grad(self, batch):
            return self.inner.loss_and_grad(batch)

        def apply_update(self, update, scale):
            self.inner.apply_update(update, scale)

    model = NoSet()
    trainer = HybridTrainer(model, Adam(model, lr=0.05), HybridConfig(**PLAIN))
    x, y = _data()
    for i in range(20):
        trainer.step(_batch(x, y, i))
    with pytest.raises(ModelError, match="set_parameters"), trainer.evaluation_parameters("lawa"):
        pass


def test_the_read_out_survives_save_and_load_bit_for_bit_and_the_runs_stay_identical(tmp_path):
    x, y = _data()
    straight, _ = _trainer()
    first, _ = _trainer()
    for i in range(130):
        straight.step(_batch(x, y, i))
        if i < 70:
            first.step(_batch(x, y, i))
    first.save(tmp_path / "r.ckpt")
    model = MLP([6, 5, 3], dtype=np.float64, seed=0)
    resumed = HybridTrainer.load(tmp_path / "r.ckpt", model, Adam(model, lr=0.05))
    for kind in ("lawa", "ema"):
        for a, b in zip(resumed.export_parameters(kind), first.export_parameters(kind)):
            np.testing.assert_array_equal(a, b)
    for i in range(70, 130):
        resumed.step(_batch(x, y, i))
    straight.flush(), resumed.flush()
    assert resumed.readout.summary() == straight.readout.summary()
    for kind in ("lawa", "ema"):
        for a, b in zip(resumed.export_parameters(kind), straight.export_parameters(kind)):
            np.testing.assert_array_equal(a, b)


def test_a_saved_read_out_for_another_model_is_refused_and_nothing_changes(tmp_path):
    from hybrid_core import CheckpointError

    x, y = _data()
    trainer, _ = _trainer()
    for i in range(40):
        trainer.step(_batch(x, y, i))
    trainer.save(tmp_path / "r.ckpt")
    state = trainer.readout.state_dict()
    state["snapshots"][0][1] = state["snapshots"][0][1][:-1]
    fresh, _ = _trainer()
    with pytest.raises(ValueError, match="does not match"):
        fresh.readout.load_state_dict(state)
    assert not fresh.readout.available("lawa")
    with pytest.raises(CheckpointError):
        HybridTrainer.load(tmp_path / "r.ckpt", MLP([6, 4, 3], dtype=np.float64), Adam(MLP([6, 4, 3]), lr=0.05))


def test_paired_comparisons_choose_the_read_out_only_when_it_does_better():
    readout = ReadOut(HybridConfig(), MLP([2, 2], dtype=np.float64))
    readout.record(1.0, {"lawa": 1.1, "ema": 1.05})
    assert readout.chosen == "raw"
    for _ in range(4):
        readout.record(1.0, {"lawa": 0.9, "ema": 0.95})
    assert readout.chosen == "lawa"
    readout.record(math.nan, {"lawa": 5.0, "ema": 5.0})  # an unusable pair changes nothing
    assert readout.chosen == "lawa"
    for _ in range(4):
        readout.record(1.0, {"lawa": 1.2, "ema": 0.99})
    assert readout.chosen == "ema"


def test_the_trainer_compares_on_its_own_batches_and_evaluates_the_better_one():
    x, y = _data()
    trainer, _ = _trainer(readout_check_every=20)
    for i in range(200):
        trainer.step(_batch(x, y, i))
    trainer.flush()
    summary = trainer.summary()["readout"]
    assert summary["comparisons"]["lawa"] >= 4 and summary["comparisons"]["ema"] >= 4
    means = {k: v for k, v in summary["mean_diff_vs_raw"].items()}
    best = min(means, key=means.get)
    assert summary["chosen"] == (best if means[best] < 0 else "raw")
    with trainer.evaluation_parameters() as name:
        assert name == summary["chosen"]


def test_non_finite_steps_never_enter_the_averages():
    x, y = _data()
    trainer, _ = _trainer(on_nonfinite="skip", readout_spacing=2)
    for i in range(60):
        batch = _batch(x, y, i)
        if i in (13, 14, 31):
            batch = (np.full_like(batch[0], np.nan), batch[1])
        trainer.step(batch)
    trainer.flush()
    assert trainer.summary()["events"]["skipped_nonfinite"] == 3
    for kind in ("lawa", "ema"):
        assert all(np.isfinite(p).all() for p in trainer.export_parameters(kind))


# -- backends ----------------------------------------------------------------------------------------


def _host(a):
    return np.asarray(a.detach().cpu().numpy() if hasattr(a, "detach") else a)


def _backend_model(backend):
    x, y = _data()
    if backend == "torch":
        import torch

        from hybrid_core.adapters.torch import TorchModel

        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
        model = TorchModel(net, lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]))
        xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y)
        return model, lambda i: (xt[i % 80:i % 80 + 16], yt[i % 80:i % 80 + 16])
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        from hybrid_core.adapters.jax import JaxModel

        def loss(params, batch):
            w, b = params
            logits = batch[0] @ w + b
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(batch[1].shape[0]), batch[1]])

        params = [jnp.asarray(np.random.default_rng(0).normal(size=(6, 3)) * 0.3, dtype=jnp.float32),
                  jnp.zeros(3, dtype=jnp.float32)]
        xj, yj = jnp.asarray(x, dtype=jnp.float32), jnp.asarray(y)
        return JaxModel(loss, params), lambda i: (xj[i % 80:i % 80 + 16], yj[i % 80:i % 80 + 16])
    model = MLP([6, 5, 3], dtype=np.float64, seed=0)
    return model, lambda i: _batch(x, y, i)


def _backend_optimizer(backend, model):
    if backend == "torch":
        import torch

        from hybrid_core.adapters.torch import TorchOptimizer

        return TorchOptimizer(model, torch.optim.Adam(model.parameters(), lr=0.05))
    if backend == "jax":
        import optax

        from hybrid_core.adapters.jax import OptaxOptimizer

        return OptaxOptimizer(model, optax.inject_hyperparams(optax.adam)(learning_rate=0.05))
    return Adam(model, lr=0.05)


@pytest.mark.parametrize("eval_for_loss", [True, False])
def test_with_dropout_the_read_out_is_paired_with_the_raw_weights_in_the_same_mode(eval_for_loss):
    """At lr 0 the read-outs are the raw weights themselves. With ``loss`` in eval mode (dropout off) the raw
    side of each comparison must be the raw weights' ``loss`` too, so every difference is exactly 0 and the raw
    weights stay chosen (up to the float32 rounding of an average of equal snapshots); paired with the dropout
    training loss the read-out would look better than itself."""
    torch = pytest.importorskip("torch")
    from hybrid_core.adapters.torch import TorchModel, TorchOptimizer

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Dropout(0.5),
                              torch.nn.Linear(64, 3))
    model = TorchModel(net, lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]),
                       eval_for_loss=eval_for_loss)
    trainer = HybridTrainer(model, TorchOptimizer(model, torch.optim.Adam(net.parameters(), lr=0.0)),
                            HybridConfig(**{**PLAIN, "readout_check_every": 10}))
    g = torch.Generator().manual_seed(1)
    for _ in range(120):
        trainer.step((torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)))
    trainer.flush()
    summary = trainer.summary()["readout"]
    assert sum(summary["comparisons"].values()) >= 4
    diffs = [v for v in summary["mean_diff_vs_raw"].values() if v is not None]
    if eval_for_loss:
        assert diffs and all(abs(d) < 1e-5 for d in diffs) and summary["chosen"] == "raw"
    else:  # `loss` in train mode: a fresh dropout mask per pass, the pairs differ by noise only
        assert diffs and any(abs(d) > 1e-3 for d in diffs)
