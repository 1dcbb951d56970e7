"""The learning-rate recommendation: where it applies, what it estimates, and how it backs off."""

import math

import numpy as np
import pytest
from _namespaces import available
from hypothesis import given, settings
from hypothesis import strategies as st

from hybrid_core import DivergenceError, HybridConfig, HybridTrainer
from hybrid_core.models import MLP
from hybrid_core.optim import SGD, Adam


class Cliff:
    """Σ batch·(θ − 1)² on 4 weights, with a cliff: loss and gradient are NaN wherever |θ| > 1.5.

    From θ = 0 at a small rate the optimum is far, so the estimate raises the rate until Adam's
    steps (about one rate long) overshoot past the cliff.
    """

    def __init__(self):
        self.w = np.zeros(4)

    def parameters(self):
        return [self.w]

    def loss(self, batch):
        return self.loss_and_grad(batch)[0]

    def loss_and_grad(self, batch):
        bad = np.abs(self.w) > 1.5
        loss = np.sum(batch * (self.w - 1.0) ** 2) + (np.nan if bad.any() else 0.0)
        return np.asarray(loss), [2 * batch * (self.w - 1.0) + np.where(bad, np.nan, 0.0)]

    def apply_update(self, update, scale):
        self.w = self.w + scale * update[0]

    def set_parameters(self, values):
        self.w = np.array(values[0], copy=True)


@pytest.mark.parametrize("read_every", [1, 8])
def test_a_rate_that_diverges_is_backed_off_remembered_and_the_weights_stay_finite(read_every):
    model = Cliff()
    trainer = HybridTrainer(model, Adam(model, lr=1e-3), HybridConfig(warmup_steps=20, read_every=read_every,
                                                                      on_nonfinite="skip"))
    rng = np.random.default_rng(0)
    gave_up = False
    try:
        for _ in range(300):
            trainer.step(rng.uniform(0.5, 1.5, size=4))
        trainer.flush()
    except DivergenceError as exc:
        # Read before every update, read_every=1 keeps no verified point: the weights the raised rate reached
        # lie past the cliff, where every loss is NaN; skipping gives up after max_consecutive_skips in a row.
        assert "after 100 batches in a row were skipped" in exc.message and "giving up" in exc.message
        gave_up = True
    assert gave_up == (read_every == 1)
    lr = trainer.summary()["lr"]
    backoffs = [h for h in lr["history"] if h[2].startswith("back-off")]
    assert backoffs, lr["history"]
    raised = max(h[1] for h in lr["history"])
    assert raised > 10  # the estimate did raise the rate far before it diverged
    # Remembered: never again at or above a rate that failed.
    assert lr["ceiling"] is not None and lr["multiplier"] <= lr["ceiling"] < raised
    after = lr["history"][lr["history"].index(backoffs[0]):]
    assert all(h[1] <= lr["ceiling"] + 1e-12 for h in after if h[2] == "estimate")
    assert np.isfinite(model.w).all()
    assert trainer.optimizer.lr == pytest.approx(lr["lr"])
    if read_every > 1:
        # The lagged path went back to a verified point and on training to the optimum. (Read before
        # every update, read_every=1 keeps no verified point: it lowers the rate for the steps after,
        # and the weights the raised rate reached stay; see docs/theory.md.)
        assert np.max(np.abs(model.w - 1.0)) < 0.05


def test_with_raise_the_lagged_path_backs_off_and_replays_instead_of_raising():
    model = Cliff()
    trainer = HybridTrainer(model, Adam(model, lr=1e-3), HybridConfig(warmup_steps=20))
    rng = np.random.default_rng(1)
    for _ in range(200):
        trainer.step(rng.uniform(0.5, 1.5, size=4))
    trainer.flush()
    events = trainer.summary()["events"]
    assert events["late_nonfinite_rollbacks"] >= 1 and events["lr_backoff_replays"] >= 1
    assert trainer.summary()["lr"]["backoffs"] >= 1
    assert np.isfinite(model.w).all()
    # Every step was recorded once: the replays do not count the steps read before again.
    assert trainer.metrics.summary()["steps"] == trainer.steps_done == 200


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), lr=st.floats(1e-4, 1e-1), dim=st.integers(1, 8))
def test_on_a_convex_problem_the_estimate_never_exceeds_the_distance_to_the_optimum(seed, lr, dim):
    """Prodigy's bound: Σλ⟨g_k, x₀ − x_k⟩ ≤ Σλ⟨g_k, x₀ − x*⟩ ≤ ‖Σλ g_k‖₁·‖x₀ − x*‖∞ for convex f."""
    rng = np.random.default_rng(seed)
    target = rng.normal(size=dim) * rng.uniform(0.1, 10)
    scale = rng.uniform(0.1, 10, size=dim)

    class Quadratic(Cliff):
        def __init__(self):
            self.w = np.zeros(dim)

        def loss_and_grad(self, batch):
            return np.asarray(np.sum(scale * batch * (self.w - target) ** 2)), [2 * scale * batch * (self.w - target)]

    model = Quadratic()
    trainer = HybridTrainer(model, Adam(model, lr=lr), HybridConfig(warmup_steps=10, lr_search_steps=120))
    for _ in range(120):
        trainer.step(rng.uniform(0.5, 1.5, size=dim))
    trainer.flush()
    tuner = trainer.lr_tuner
    assert tuner._d_max <= np.max(np.abs(target)) * (1 + 1e-9)
    assert tuner.multiplier >= 1.0


def test_the_search_goes_on_while_the_estimate_climbs_below_the_rate_and_ends_once_it_settles():
    from hybrid_core._lrtune import _PATIENCE, LRTuner

    model = MLP([4, 3], dtype=np.float64)
    opt = Adam(model, lr=1.0)
    tuner = LRTuner(HybridConfig(lr_search_steps=10_000), opt)
    every = tuner._every
    reads = 0
    # From pretrained weights the estimate starts far below the rate and climbs (×1.5 per read): the
    # search must not end while it does, though the rate is not raised for 11 reads.
    for reads, d in enumerate([0.01 * 1.5 ** k for k in range(14)], start=1):
        tuner.update(reads * every - 1, [d])
        assert tuner.searching(reads * every)
    assert tuner.multiplier == pytest.approx(0.01 * 1.5 ** 13)
    settled = tuner.multiplier
    for k in range(_PATIENCE):  # then it settles: the search ends after _PATIENCE reads without a rise
        assert tuner.searching((reads + k) * every)
        tuner.update((reads + k + 1) * every - 1, [settled * 0.5])
    assert not tuner.searching((reads + _PATIENCE + 1) * every)
    assert tuner.history[-1][2] == "search ended" and tuner.multiplier == settled


def test_it_is_off_for_optimizers_it_does_not_fit_and_says_why():
    model = MLP([4, 3], dtype=np.float64)
    sgd = HybridTrainer(model, SGD(model, lr=0.1))
    assert not sgd.lr_tuner.enabled and "Adam-like" in sgd.summary()["lr"]["off_because"]
    off = HybridTrainer(model, Adam(model, lr=0.1), HybridConfig(lr_recommend=False))
    assert off.summary()["lr"]["off_because"] == "HybridConfig.lr_recommend=False"
    model2 = MLP([4, 3], dtype=np.float64)
    on = HybridTrainer(model2, Adam(model2, lr=0.1))
    assert on.lr_tuner.enabled and on.summary()["lr"]["multiplier"] == 1.0


@pytest.mark.skipif(not available("torch"), reason="torch is not installed")
def test_torch_adam_takes_it_and_a_scheduler_turns_it_off():
    import torch

    from hybrid_core.adapters.torch import TorchModel, TorchOptimizer

    net = torch.nn.Linear(3, 2)
    model = TorchModel(net, lambda m, b: m(b).pow(2).mean())
    adam = torch.optim.Adam(net.parameters(), lr=1e-3)
    assert HybridTrainer(model, TorchOptimizer(model, adam)).lr_tuner.enabled
    sched = torch.optim.lr_scheduler.StepLR(adam, 10)
    assert "scheduler" in HybridTrainer(model, TorchOptimizer(model, adam, scheduler=sched)).lr_tuner.reason
    sgd = torch.optim.SGD(net.parameters(), lr=1e-3)
    assert not HybridTrainer(model, TorchOptimizer(model, sgd)).lr_tuner.enabled


def test_a_rate_set_from_outside_stops_the_recommendation():
    x = np.random.default_rng(0).normal(size=(64, 4))
    y = (x[:, 0] > 0).astype(np.int64)
    model = MLP([4, 8, 2], dtype=np.float64, seed=0)
    opt = Adam(model, lr=1e-3)
    trainer = HybridTrainer(model, opt, HybridConfig(warmup_steps=10))
    for _i in range(20):
        trainer.step((x, y))
    opt.lr = 0.005  # a callback or the user takes over
    for _i in range(40):
        trainer.step((x, y))
    trainer.flush()
    lr = trainer.summary()["lr"]
    assert not lr["recommend"] and "set from outside" in lr["off_because"]
    assert opt.lr == 0.005


def test_the_multiplier_and_the_estimate_survive_a_checkpoint_bit_for_bit(tmp_path):
    x = np.random.default_rng(0).normal(size=(64, 4))
    y = (x[:, 0] > 0).astype(np.int64)

    def batch(i):
        idx = np.random.default_rng(i).choice(64, 16, replace=False)
        return x[idx], y[idx]

    def make():
        model = MLP([4, 8, 2], dtype=np.float64, seed=0)
        return model, HybridTrainer(model, Adam(model, lr=1e-3), HybridConfig(warmup_steps=10, lr_search_steps=60))

    straight_model, straight = make()
    _first_model, first = make()
    for i in range(100):
        straight.step(batch(i))
        if i < 30:  # stop inside the search
            first.step(batch(i))
    first.save(tmp_path / "t.ckpt")
    model = MLP([4, 8, 2], dtype=np.float64, seed=0)
    resumed = HybridTrainer.load(tmp_path / "t.ckpt", model, Adam(model, lr=1e-3))
    assert resumed.optimizer.lr == first.optimizer.lr != 1e-3
    for i in range(30, 100):
        resumed.step(batch(i))
    straight.flush(), resumed.flush()
    assert resumed.summary()["lr"] == straight.summary()["lr"]
    for a, b in zip(model.parameters(), straight_model.parameters()):
        np.testing.assert_array_equal(a, b)
    assert math.isfinite(resumed.summary()["lr"]["multiplier"])


@pytest.mark.skipif(not available("torch"), reason="torch is not installed")
def test_the_fused_torch_step_feeds_the_estimate_as_the_unfused_path_does():
    import torch

    from hybrid_core.adapters.torch import TorchModel, TorchOptimizer

    x = torch.from_numpy(np.random.default_rng(0).normal(size=(64, 6))).float()
    y = (x[:, 0] > 0).long()

    def run(fused):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        model = TorchModel(net, lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]))
        opt = TorchOptimizer(model, torch.optim.Adam(net.parameters(), lr=1e-3))
        calls = []
        if fused:
            original = opt.fused_step

            def spy(batch, measure, before_update=None):
                calls.append(before_update is not None)
                return original(batch, measure, before_update=before_update)

            opt.fused_step = spy
        else:
            opt.accepts_before_update = False  # the trainer then takes the unfused path while it searches
        trainer = HybridTrainer(model, opt, HybridConfig(warmup_steps=10, lr_search_steps=40))
        for i in range(60):
            trainer.step((x[i % 48:i % 48 + 16], y[i % 48:i % 48 + 16]))
        trainer.flush()
        return trainer.summary()["lr"]["history"], calls

    fused, calls = run(True)
    unfused, none = run(False)
    assert calls and all(calls[:40]) and not any(calls[40:]) and not none
    assert [h[0] for h in fused] == [h[0] for h in unfused] and len(fused) >= 2
    for a, b in zip(fused, unfused):
        assert a[1] == pytest.approx(b[1], rel=1e-4)


@pytest.mark.skipif(not available("jax"), reason="jax is not installed")
def test_the_fused_jax_step_feeds_the_estimate_as_the_unfused_path_does():
    import jax
    import jax.numpy as jnp
    import optax

    from hybrid_core.adapters.jax import JaxModel, OptaxOptimizer

    x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 6)), dtype=jnp.float32)
    y = (x[:, 0] > 0).astype(jnp.int32)

    def loss(params, batch):
        w, b = params
        logits = batch[0] @ w + b
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(batch[1].shape[0]), batch[1]])

    def run(fused):
        params = [jnp.asarray(np.random.default_rng(1).normal(size=(6, 2)) * 0.3, dtype=jnp.float32),
                  jnp.zeros(2, dtype=jnp.float32)]
        model = JaxModel(loss, params)
        opt = OptaxOptimizer(model, optax.inject_hyperparams(optax.adam)(learning_rate=1e-3))
        if not fused:
            opt.accepts_before_update = False
        trainer = HybridTrainer(model, opt, HybridConfig(warmup_steps=10, lr_search_steps=40))
        for i in range(60):
            trainer.step((x[i % 48:i % 48 + 16], y[i % 48:i % 48 + 16]))
        trainer.flush()
        return trainer.summary()["lr"]["history"]

    fused, unfused = run(True), run(False)
    assert len(fused) >= 2 and [h[0] for h in fused] == [h[0] for h in unfused]
    for a, b in zip(fused, unfused):
        assert a[1] == pytest.approx(b[1], rel=1e-4)
