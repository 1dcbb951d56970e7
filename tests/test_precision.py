"""Low precision: bfloat16 host reads and checkpoints, bf16 models on torch and JAX through the trainer, float16
autocast with a GradScaler whose skipped steps are counted and never taken for divergence."""

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybrid_core import HybridConfig, HybridTrainer, Phase
from hybrid_core._backend import to_host_floats, to_numpy
from hybrid_core._codec import decode, encode
from hybrid_core._persist import _Converter, _host

torch = pytest.importorskip("torch", reason="the precision tests need torch")

from hybrid_core import CheckpointError, ConfigError  # noqa: E402
from hybrid_core.adapters.torch import TorchModel, TorchOptimizer  # noqa: E402

# Every phase within a short run: confidence_threshold=0 lets each decision predict.
CONFIG = HybridConfig(warmup_steps=20, min_full_steps=10, max_predict_steps=10, horizon_arms=(0, 5, 10), probe_steps=3,
                      check_interval=3, correct_steps=3, confidence_threshold=0.0, idle_after=0, read_every=4,
                      lr_search_steps=40)
W_TRUE = np.random.default_rng(1).normal(size=(8, 1))


def _data(step, n=32):
    rng = np.random.default_rng(step)
    x = rng.normal(size=(n, 8))
    return x, np.tanh(x @ W_TRUE) + 0.05 * rng.normal(size=(n, 1))


def _torch_model(dtype=torch.float32, loss_fn=None, **kw):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(dtype)
    return TorchModel(net, loss_fn or (lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])), **kw)


def _torch_batch(step, dtype=torch.float32):
    return tuple(torch.as_tensor(a, dtype=dtype) for a in _data(step))


def _all_phases_and_finite(trainer):
    counts = trainer.summary()["steps_per_phase"]
    assert all(counts[p.value] > 0 for p in Phase), counts
    losses = [r.loss for r in trainer.metrics.records if r.loss is not None]
    assert losses and all(math.isfinite(v) for v in losses)
    return losses


# -- host reads and checkpoints of bfloat16 ---------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-2.0**100, 2.0**100, allow_nan=False, width=32), min_size=1, max_size=20))
def test_bfloat16_and_float16_read_to_the_host_exactly(values):
    bf = torch.tensor(values, dtype=torch.bfloat16)
    half = torch.tensor(values, dtype=torch.float32).clamp(-6e4, 6e4).to(torch.float16)
    expected_bf = bf.to(torch.float64).tolist()
    host = to_numpy(bf)
    assert host.dtype == np.float32 and host.tolist() == expected_bf  # NumPy has no bfloat16: float32, exact
    assert to_numpy(half).dtype == np.float16  # NumPy has float16: kept
    got = to_host_floats([bf[0], bf, half])
    assert got == [expected_bf[0], *expected_bf, *half.to(torch.float64).tolist()]


def test_jax_bfloat16_reads_to_the_host_exactly():
    jnp = pytest.importorskip("jax.numpy", reason="jax is not installed")
    values = jnp.asarray([1.5, -3.0e-20, 2.0**100, 7.0], dtype=jnp.bfloat16)
    expected = [float(v) for v in np.asarray(values.astype(jnp.float32))]
    host = to_numpy(values)
    assert host.dtype == np.float32 and host.tolist() == expected
    assert to_host_floats([values[0], values, jnp.asarray([0.25], dtype=jnp.float16)]) == [1.5, *expected, 0.25]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(allow_nan=False, width=32), min_size=0, max_size=20))
def test_bfloat16_arrays_round_trip_through_the_checkpoint_codec_bit_for_bit(values):
    saved = torch.tensor(values, dtype=torch.bfloat16).reshape(-1, 1)
    payload = encode({"a": saved, "b": [torch.ones(2, dtype=torch.bfloat16)]}, _host)
    back = _Converter("torch", torch, torch.device("cpu"))(decode(payload))
    assert back["a"].dtype == torch.bfloat16 and tuple(back["a"].shape) == tuple(saved.shape)
    assert torch.equal(back["a"].view(torch.int16), saved.view(torch.int16))
    assert back["b"][0].dtype == torch.bfloat16


def test_statistics_of_a_low_precision_loss_are_computed_in_float32():
    from hybrid_core.kernels import fused_stats

    for dtype in (torch.float16, torch.bfloat16):
        grads = [torch.full((100,), 100.0, dtype=dtype)]  # Σg² = 1e6: inf in float16, 4 digits lost in bfloat16
        stats = fused_stats(torch.tensor(1.0, dtype=dtype), grads, [g * -0.5 for g in grads])
        assert stats.dtype == torch.float32
        assert stats.tolist() == [1.0, 1e6, 2.5e5, -5e5, 100.0, 0.0]


def test_bfloat16_is_stored_in_two_bytes_per_value():
    small = len(encode(torch.zeros(1000, dtype=torch.bfloat16), _host))
    wide = len(encode(torch.zeros(1000, dtype=torch.float32), _host))
    assert small < 2100 < 4000 < wide


# -- bfloat16 models through the trainer ----------------------------------------------------------------------


def _torch_trainer(dtype):
    model = _torch_model(dtype)
    opt = TorchOptimizer(model, torch.optim.Adam(model.parameters(), lr=1e-2))
    return HybridTrainer(model, opt, CONFIG)


def test_bfloat16_torch_model_trains_through_every_phase_and_resumes_from_a_checkpoint(tmp_path):
    trainer = _torch_trainer(torch.bfloat16)
    trainer.fit(lambda i: _torch_batch(i, torch.bfloat16), steps=150, progress=False)
    losses = _all_phases_and_finite(trainer)
    assert np.mean(losses[-10:]) < 0.2 * np.mean(losses[:5])
    trainer.save(tmp_path / "bf16.ckpt")
    fresh = _torch_trainer(torch.bfloat16)
    resumed = HybridTrainer.load(tmp_path / "bf16.ckpt", fresh.model, fresh.optimizer)
    for a, b in zip(resumed.model.parameters(), trainer.model.parameters(), strict=True):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    adam = resumed.optimizer.optimizer.state
    assert {t.dtype for s in adam.values() for k, t in s.items() if k != "step"} == {torch.bfloat16}
    for t in (trainer, resumed):
        t.fit(lambda i: _torch_batch(i, torch.bfloat16), steps=20, progress=False)
    for a, b in zip(resumed.model.parameters(), trainer.model.parameters(), strict=True):
        assert torch.equal(a, b)


def _jax_setup(dtype):
    import jax
    import jax.numpy as jnp
    import optax

    from hybrid_core.adapters.jax import JaxModel, OptaxOptimizer

    rng = np.random.default_rng(0)
    params = {"0_w": jnp.asarray(rng.normal(0, 0.3, (8, 16)), dtype=dtype), "0_b": jnp.zeros(16, dtype),
              "1_w": jnp.asarray(rng.normal(0, 0.3, (16, 1)), dtype=dtype), "1_b": jnp.zeros(1, dtype)}
    model = JaxModel(_jax_mse, params)
    tx = optax.inject_hyperparams(optax.adam, hyperparam_dtype=jnp.float32)(learning_rate=1e-2)
    return model, OptaxOptimizer(model, tx), jax


def _jax_mse(params, batch):
    import jax.numpy as jnp

    x, y = batch
    out = jnp.tanh(x @ params["0_w"] + params["0_b"]) @ params["1_w"] + params["1_b"]
    return jnp.mean((out - y) ** 2)


@pytest.mark.slow  # JAX compiles the bfloat16 step in several variants: ~30-50 s on two shared cores
def test_bfloat16_jax_model_trains_through_every_phase_and_resumes_from_a_checkpoint(tmp_path):
    jnp = pytest.importorskip("jax.numpy", reason="jax is not installed")
    pytest.importorskip("optax", reason="optax is not installed")
    bf16 = jnp.bfloat16

    def batch(i):
        return tuple(jnp.asarray(a, dtype=bf16) for a in _data(i))

    model, opt, jax = _jax_setup(bf16)
    trainer = HybridTrainer(model, opt, CONFIG)
    trainer.fit(batch, steps=150, progress=False)
    losses = _all_phases_and_finite(trainer)
    assert np.mean(losses[-10:]) < 0.2 * np.mean(losses[:5])
    trainer.save(tmp_path / "bf16.ckpt")
    fresh_model, fresh_opt, _ = _jax_setup(bf16)
    resumed = HybridTrainer.load(tmp_path / "bf16.ckpt", fresh_model, fresh_opt)
    for a, b in zip(resumed.model.parameters(), trainer.model.parameters(), strict=True):
        assert a.dtype == bf16 and bool(jnp.array_equal(a, b))
    saved, restored = (jax.tree_util.tree_leaves(t.optimizer.opt_state) for t in (trainer, resumed))
    assert [a.dtype for a in saved] == [a.dtype for a in restored]  # optax widened Adam's μ to float32: kept
    for t in (trainer, resumed):
        t.fit(batch, steps=20, progress=False)
    for a, b in zip(resumed.model.parameters(), trainer.model.parameters(), strict=True):
        assert bool(jnp.array_equal(a, b))


def test_optax_hyperparameters_injected_in_bfloat16_are_a_config_error():
    jnp = pytest.importorskip("jax.numpy", reason="jax is not installed")
    optax = pytest.importorskip("optax", reason="optax is not installed")
    from hybrid_core.adapters.jax import JaxModel, OptaxOptimizer

    model = JaxModel(_jax_mse, {"0_w": jnp.zeros((8, 16), jnp.bfloat16), "0_b": jnp.zeros(16, jnp.bfloat16),
                                "1_w": jnp.zeros((16, 1), jnp.bfloat16), "1_b": jnp.zeros(1, jnp.bfloat16)})
    with pytest.raises(ConfigError, match="bfloat16") as err:
        OptaxOptimizer(model, optax.inject_hyperparams(optax.adam)(learning_rate=1e-2))
    assert "hyperparam_dtype=jnp.float32" in err.value.recovery


# -- float16 autocast with a GradScaler ---------------------------------------------------------------------


def _poisoned_loss(module, batch):
    """MSE; a batch flagged True gets an inf gradient at the first layer's output (a forced fp16 overflow)."""
    x, y, poison = batch
    hidden = module[0](x)
    if poison:
        hidden.register_hook(lambda g: torch.full_like(g, math.inf))
    return torch.nn.functional.mse_loss(module[2](module[1](hidden)), y)


def _scaled(init_scale=1024.0, autocast=torch.float16, scheduler=False):
    model = _torch_model(loss_fn=_poisoned_loss, autocast=autocast)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=10**6)
    adam = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(adam, lambda k: 1.0 / (1 + k)) if scheduler else None
    return model, TorchOptimizer(model, adam, sched, scaler=scaler), scaler


def _snapshot(tensors):
    return [t.detach().clone() for t in tensors]


def test_a_step_the_scaler_skips_changes_nothing_returns_no_statistics_and_is_counted():
    model, opt, scaler = _scaled(scheduler=True)
    x, y = _torch_batch(0)
    opt.fused_step((x, y, False), True)
    before, state = _snapshot(model.parameters()), _snapshot([opt.optimizer.state[p]["exp_avg"]
                                                               for p in model.parameters()])
    loss, stats = opt.fused_step((x, y, True), True)
    assert stats is None and math.isfinite(float(loss))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert all(torch.equal(opt.optimizer.state[p]["exp_avg"], s) for p, s in zip(model.parameters(), state))
    assert opt.skipped_steps == 1 and scaler.get_scale() == 512.0
    assert opt.scheduler.last_epoch == 2  # the trainer counts the skipped step: so does the schedule
    loss, stats = opt.fused_step((x, y, False), True)
    assert stats is not None and all(math.isfinite(v) for v in stats.tolist())
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert opt.summary() == {"skipped_steps": 1, "loss_scale": 512.0}


def test_the_loss_is_scaled_before_backward_and_the_gradients_unscaled_before_clipping_and_the_step():
    # In float32 a power-of-two scale is exact: the scaled run must match the plain one bit for bit.
    plain_model, scaled_model = _torch_model(loss_fn=_poisoned_loss), _torch_model(loss_fn=_poisoned_loss)
    plain = TorchOptimizer(plain_model, torch.optim.Adam(plain_model.parameters(), lr=1e-2), clip_grad_norm=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)
    scaled = TorchOptimizer(scaled_model, torch.optim.Adam(scaled_model.parameters(), lr=1e-2), clip_grad_norm=0.5,
                            scaler=scaler)
    seen = []
    scaled_model.module[2].weight.register_hook(lambda g: seen.append(g.abs().max().item()) or g)
    for step in range(3):
        batch = (*_torch_batch(step), False)
        fed = []
        feed = fed.append
        _, plain_stats = plain.fused_step(batch, True, before_update=lambda g, feed=feed: feed(_snapshot(g)))
        _, scaled_stats = scaled.fused_step(batch, True, before_update=lambda g, feed=feed: feed(_snapshot(g)))
        assert torch.equal(plain_stats, scaled_stats)
        assert all(torch.equal(a, b) for a, b in zip(*fed))  # the learning-rate feed gets the true gradients
    assert min(seen) > 1e3  # the backward pass really ran on the scaled loss
    assert all(torch.equal(a, b) for a, b in zip(plain_model.parameters(), scaled_model.parameters()))


def test_float16_autocast_with_a_scaler_trains_and_skipped_steps_are_not_divergence(tmp_path):
    poisoned = {3, 5, 11, 13, 60}  # 3 and 11 measured (read_every=4); all but 60 in the learning-rate search
    model, opt, scaler = _scaled()
    trainer = HybridTrainer(model, opt, CONFIG)
    first_logits = []
    model.module[0].register_forward_hook(lambda m, i, out: None if first_logits else first_logits.append(out.dtype))
    trainer.fit(lambda i: (*_torch_batch(i), i in poisoned), steps=150, progress=False)
    summary = trainer.summary()
    assert first_logits == [torch.float16]  # autocast ran the layer in float16
    losses = _all_phases_and_finite(trainer)
    assert np.mean(losses[-10:]) < 0.2 * np.mean(losses[:5])
    assert summary["optimizer"] == {"skipped_steps": 5, "loss_scale": 1024.0 / 2**5}
    for event in ("late_nonfinite_rollbacks", "lr_backoffs_nonfinite", "skipped_nonfinite", "monitor_force_full"):
        assert event not in summary["events"], summary["events"]
    assert summary["lr"]["backoffs"] == 0
    # The learning-rate estimate still rose after the first skipped steps (no inf reached it).
    assert any(entry[2] == "estimate" and entry[0] > 5 for entry in summary["lr"]["history"]), summary["lr"]
    trainer.save(tmp_path / "fp16.ckpt")
    model2, opt2, scaler2 = _scaled(init_scale=8.0)
    resumed = HybridTrainer.load(tmp_path / "fp16.ckpt", model2, opt2)
    assert scaler2.get_scale() == scaler.get_scale() and opt2.skipped_steps == 5
    assert resumed.summary()["optimizer"] == summary["optimizer"]


def test_the_scaler_state_is_part_of_the_optimizer_state():
    _, opt, scaler = _scaled()
    opt.fused_step((*_torch_batch(0), True), False)
    state = opt.state_dict()
    assert state["scaler"] == {"state": scaler.state_dict(), "skipped_steps": 1}
    _, other, other_scaler = _scaled(init_scale=4.0)
    other.load_state_dict(state)
    assert other_scaler.get_scale() == 512.0 and other.skipped_steps == 1
    plain_model = _torch_model()
    plain = TorchOptimizer(plain_model, torch.optim.Adam(plain_model.parameters(), lr=1e-2))
    with pytest.raises(CheckpointError, match="GradScaler"):
        plain.load_state_dict(state)
    bad = {**state, "scaler": {"state": {}, "skipped_steps": 1}}
    before = other_scaler.get_scale()
    with pytest.raises(CheckpointError, match="GradScaler"):
        other.load_state_dict(bad)
    assert other_scaler.get_scale() == before
    without = {k: v for k, v in state.items() if k != "scaler"}
    with pytest.raises(CheckpointError, match="GradScaler"):
        other.load_state_dict(without)


def test_a_skipped_first_step_does_not_make_the_scheduler_warn():
    _, opt, _ = _scaled(scheduler=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.fused_step((*_torch_batch(0), True), True)
    assert opt.skipped_steps == 1 and opt.scheduler.last_epoch == 1


class _Wrapped:
    """A `Model` around a TorchModel that is not one itself."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def parameters(self):
        return self.inner.parameters()

    def loss(self, batch):
        return self.inner.loss(batch)

    def loss_and_grad(self, batch):
        return self.inner.loss_and_grad(batch)

    def apply_update(self, update, scale):
        self.inner.apply_update(update, scale)


def test_bad_scaler_and_autocast_settings_are_config_errors():
    model = _torch_model()
    adam = torch.optim.Adam(model.parameters(), lr=1e-2)
    with pytest.raises(ConfigError, match="GradScaler"):
        TorchOptimizer(model, adam, scaler=object())
    with pytest.raises(ConfigError, match="needs a TorchModel"):
        TorchOptimizer(_Wrapped(model), adam, scaler=torch.amp.GradScaler("cpu"))
    half = _torch_model(torch.float16)
    with pytest.raises(ConfigError, match="cannot unscale float16 gradients"):
        TorchOptimizer(half, torch.optim.SGD(half.parameters(), lr=0.1), scaler=torch.amp.GradScaler("cpu"))
    meta = TorchModel(torch.nn.Linear(2, 1).to("meta"), lambda m, b: m(b).sum())
    with pytest.raises(ConfigError, match="built for 'cpu' but the model is on meta"):
        TorchOptimizer(meta, torch.optim.SGD(meta.parameters(), lr=0.1), scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(ConfigError, match="fused=True"):
        TorchOptimizer(model, torch.optim.Adam(model.parameters(), lr=1e-2, fused=True),
                       scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(ConfigError, match=r"autocast=torch\.float32"):
        _torch_model(autocast=torch.float32)
    with pytest.raises(ConfigError, match="accumulate=0"):
        _torch_model(accumulate=0)
