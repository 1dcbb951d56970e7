"""The contracts every `Model`/`Optimizer` pair must keep; each failure names its contract."""

from __future__ import annotations

import math
from typing import Any

import array_api_compat
import numpy as np

from hybrid_core import HybridConfig, HybridTrainer, Phase
from hybrid_core._backend import from_numpy, to_numpy
from hybrid_core.conformance import ConformanceCase

SHORT_RUN = HybridConfig(warmup_steps=10, min_full_steps=10, max_full_steps=20, max_predict_steps=10,
                         probe_steps=3, check_interval=3, correct_steps=3)


def _is64(params: list[Any]) -> bool:
    return all("64" in str(p.dtype) for p in params)


def _setup(case: ConformanceCase, seed: int = 0) -> tuple[Any, Any, Any, Any]:
    model = case.make_model(seed)
    return model, case.make_optimizer(model), case.make_batches(seed), array_api_compat.array_namespace(
        *model.parameters())


def _seeded(case: ConformanceCase, method: Any, batch: Any) -> Any:
    if case.reseed is not None:
        case.reseed()
    return method(batch)


def _host(params: list[Any]) -> list[np.ndarray]:
    return [np.array(to_numpy(p), dtype=np.float64) for p in params]


def test_loss_is_a_finite_scalar_of_the_model_namespace(hybrid_case: ConformanceCase) -> None:
    model, _, batches, xp = _setup(hybrid_case)
    loss = _seeded(hybrid_case, model.loss, next(batches))
    contract = "contract 'loss is a finite scalar of the model's namespace and device'"
    assert array_api_compat.array_namespace(loss) is xp, f"{contract}: loss is of another array library"
    assert tuple(loss.shape) == (), f"{contract}: loss has shape {tuple(loss.shape)}"
    assert math.isfinite(float(to_numpy(loss))), f"{contract}: loss is {float(to_numpy(loss))}"
    device = array_api_compat.device(model.parameters()[0])
    assert array_api_compat.device(loss) == device, f"{contract}: loss on {array_api_compat.device(loss)}"


def test_loss_and_grad_matches_finite_differences(hybrid_case: ConformanceCase) -> None:
    model, _, batches, xp = _setup(hybrid_case)
    batch = next(batches)
    params = model.parameters()
    wide = not _is64(params)
    eps = hybrid_case.fd_eps or (1e-2 if wide else 1e-6)
    rtol = hybrid_case.grad_rtol or (5e-2 if wide else 1e-5)
    rng = np.random.default_rng(7)
    direction = [from_numpy(xp, rng.normal(size=tuple(p.shape)), dtype=p.dtype,
                            device=array_api_compat.device(p)) for p in params]
    _, grads = _seeded(hybrid_case, model.loss_and_grad, batch)
    analytic = sum(float(np.sum(g * d)) for g, d in zip(_host(grads), _host(direction)))
    model.apply_update(direction, eps)
    up = float(to_numpy(_seeded(hybrid_case, model.loss, batch)))
    model.apply_update(direction, -2 * eps)
    down = float(to_numpy(_seeded(hybrid_case, model.loss, batch)))
    model.apply_update(direction, eps)
    numeric = (up - down) / (2 * eps)
    scale = max(abs(numeric), abs(analytic), 1e-8)
    assert abs(numeric - analytic) <= rtol * scale, (
        f"contract 'loss_and_grad agrees with a finite-difference directional derivative': "
        f"gradient·d = {analytic:.6g}, (L(θ+εd) − L(θ−εd))/2ε = {numeric:.6g} (rtol {rtol}); "
        "check the gradient's sign and scale"
    )


def test_apply_update_round_trip_restores_parameters(hybrid_case: ConformanceCase) -> None:
    model, _, _, xp = _setup(hybrid_case)
    before = _host(model.parameters())
    rng = np.random.default_rng(3)
    update = [from_numpy(xp, rng.normal(size=tuple(p.shape)), dtype=p.dtype,
                         device=array_api_compat.device(p)) for p in model.parameters()]
    model.apply_update(update, 0.37)
    moved = _host(model.parameters())
    model.apply_update(update, -0.37)
    atol = hybrid_case.round_trip_atol or (1e-5 if not _is64(model.parameters()) else 1e-12)
    contract = "contract 'apply_update(u, s) then apply_update(u, -s) restores the parameters'"
    assert any(not np.allclose(a, b) for a, b in zip(before, moved)), f"{contract}: apply_update changed nothing"
    for i, (a, b) in enumerate(zip(before, _host(model.parameters()))):
        assert np.allclose(a, b, atol=atol, rtol=0), f"{contract}: parameter {i} off by {np.max(np.abs(a - b))}"


def test_optimizer_step_changes_parameters_and_extrapolate_matches_them(hybrid_case: ConformanceCase) -> None:
    model, opt, batches, xp = _setup(hybrid_case)
    before = _host(model.parameters())
    for _ in range(3):
        opt.step(model.loss_and_grad(next(batches))[1])
    after = _host(model.parameters())
    assert any(not np.array_equal(a, b) for a, b in zip(before, after)), (
        "contract 'Optimizer.step changes the parameters': nothing moved after 3 steps")
    guess = list(opt.extrapolate())
    params = model.parameters()
    contract = "contract 'extrapolate() matches the parameters in structure, shape, dtype, namespace and device'"
    assert len(guess) == len(params), f"{contract}: {len(guess)} arrays for {len(params)} parameters"
    for i, (g, p) in enumerate(zip(guess, params)):
        assert tuple(g.shape) == tuple(p.shape), f"{contract}: array {i} shape {tuple(g.shape)} vs {tuple(p.shape)}"
        assert g.dtype == p.dtype, f"{contract}: array {i} dtype {g.dtype} vs {p.dtype}"
        assert array_api_compat.array_namespace(g) is xp, f"{contract}: array {i} is of another library"
        assert array_api_compat.device(g) == array_api_compat.device(p), f"{contract}: array {i} device"
    assert _host(model.parameters())[0].tobytes() == after[0].tobytes(), (
        "contract 'extrapolate() changes nothing': it moved the parameters")


def test_state_dict_round_trip_resumes_identically(hybrid_case: ConformanceCase) -> None:
    model_a, opt_a, batches_a, _ = _setup(hybrid_case, seed=1)
    for _ in range(3):
        opt_a.step(model_a.loss_and_grad(next(batches_a))[1])
    model_b, opt_b, _, _ = _setup(hybrid_case, seed=1)
    # An exact copy through the protocol: θ − θ is exactly 0, and 0 + θ_a is exactly θ_a.
    model_b.apply_update([p * 1 for p in model_b.parameters()], -1.0)
    model_b.apply_update([p * 1 for p in model_a.parameters()], 1.0)
    opt_b.load_state_dict(opt_a.state_dict())
    batch = next(batches_a)
    ua = _host(opt_a.step(_seeded(hybrid_case, model_a.loss_and_grad, batch)[1]))
    ub = _host(opt_b.step(_seeded(hybrid_case, model_b.loss_and_grad, batch)[1]))
    for i, (a, b) in enumerate(zip(ua, ub)):
        assert np.allclose(a, b, rtol=1e-5, atol=1e-7), (
            f"contract 'state_dict round trip': update {i} differs after load_state_dict")


def test_same_seed_gives_same_losses(hybrid_case: ConformanceCase) -> None:
    runs = []
    for _ in range(2):
        model, opt, batches, _ = _setup(hybrid_case, seed=5)
        losses = []
        if hybrid_case.reseed is not None:
            hybrid_case.reseed()
        for _ in range(5):
            loss, grads = model.loss_and_grad(next(batches))
            losses.append(float(to_numpy(loss)))
            opt.step(grads)
        runs.append(losses)
    assert runs[0] == runs[1], f"contract 'same seed gives the same losses': {runs[0]} vs {runs[1]}"


def test_short_hybrid_run_visits_every_phase_without_nan(hybrid_case: ConformanceCase) -> None:
    model, opt, batches, _ = _setup(hybrid_case, seed=2)
    trainer = HybridTrainer(model, opt, SHORT_RUN)
    summary = trainer.fit(batches, 80, progress=False)
    counts = summary["steps_per_phase"]
    contract = "contract 'a short HybridTrainer run visits every phase, counts backward passes, makes no NaN'"
    assert all(counts[p.value] > 0 for p in Phase), f"{contract}: phases {counts}"
    assert summary["backward_passes"] == summary["steps"] - counts["predict"], f"{contract}: {summary}"
    assert all(np.all(np.isfinite(p)) for p in _host(model.parameters())), f"{contract}: NaN in parameters"


def test_state_dict_is_a_snapshot_later_steps_leave_alone(hybrid_case: ConformanceCase) -> None:
    model, opt, batches, _ = _setup(hybrid_case, seed=3)
    opt.step(model.loss_and_grad(next(batches))[1])
    saved = opt.state_dict()
    frozen = [_host([a])[0] for a in _arrays(saved)]
    for _ in range(2):
        opt.step(model.loss_and_grad(next(batches))[1])
    contract = "contract 'Optimizer.state_dict() is a snapshot: later steps do not change its arrays'"
    for i, (a, b) in enumerate(zip(frozen, (_host([x])[0] for x in _arrays(saved)))):
        assert np.array_equal(a, b, equal_nan=True), f"{contract}: array {i} of the state changed"


def test_set_parameters_sets_them_exactly_even_over_nan(hybrid_case: ConformanceCase) -> None:
    model = _setup(hybrid_case, seed=4)[0]
    if not callable(getattr(model, "set_parameters", None)):
        return  # optional: without it the trainer reads every real step before its update
    target = [p * 1 for p in _setup(hybrid_case, seed=6)[0].parameters()]
    model.apply_update([p * math.nan for p in model.parameters()], 1.0)  # NaN weights
    model.set_parameters(target)
    contract = "contract 'Model.set_parameters(values) sets the parameters to exactly values'"
    for i, (a, b) in enumerate(zip(_host(model.parameters()), _host(target))):
        assert np.array_equal(a, b), f"{contract}: parameter {i} differs"


def test_fused_step_equals_loss_and_grad_then_step(hybrid_case: ConformanceCase) -> None:
    from hybrid_core import FusedStep

    model_a, opt_a, batches, _ = _setup(hybrid_case, seed=7)
    if not (isinstance(opt_a, FusedStep) and opt_a.model is model_a):
        return  # optional capability
    model_b, opt_b, _, _ = _setup(hybrid_case, seed=7)
    contract = "contract 'fused_step(batch) is loss_and_grad(batch) then step(grads)'"
    for k in range(3):
        batch = next(batches)
        measure = k == 2
        loss_a, stats = _seeded(hybrid_case, lambda b, m=measure: opt_a.fused_step(b, m), batch)
        loss_b, grads = _seeded(hybrid_case, model_b.loss_and_grad, batch)
        opt_b.step(grads)
        assert np.allclose(_host([loss_a])[0], _host([loss_b])[0], rtol=1e-5), f"{contract}: losses differ"
        assert (stats is not None) == (k == 2), f"{contract}: statistics only when measured"
    values = _host([stats])[0]
    assert values.shape == (7,) and np.all(np.isfinite(values)), f"{contract}: statistics {values}"
    assert values[0] == _host([loss_a])[0] and values[1] > 0 and values[2] > 0, f"{contract}: statistics {values}"
    for i, (a, b) in enumerate(zip(_host(model_a.parameters()), _host(model_b.parameters()))):
        assert np.allclose(a, b, rtol=1e-5, atol=1e-7), f"{contract}: parameter {i} differs"


def _arrays(value: Any) -> list[Any]:
    """Every array inside a state dict, in a fixed order."""
    if isinstance(value, dict):
        return [a for k in sorted(value, key=str) for a in _arrays(value[k])]
    if isinstance(value, (list, tuple)):
        return [a for v in value for a in _arrays(v)]
    try:
        array_api_compat.array_namespace(value)
    except TypeError:
        return []
    return [value]


def test_a_frozen_group_gets_no_gradient_and_stays_still(hybrid_case: ConformanceCase) -> None:
    model, opt, batches, _ = _setup(hybrid_case, seed=8)
    if not (callable(getattr(model, "set_trainable", None)) and callable(getattr(model, "parameter_groups", None))
            and getattr(opt, "skips_frozen", False) is True):
        return  # optional: layer freezing needs both model methods and an optimizer that skips frozen groups
    contract = "contract 'a group frozen by set_trainable gets zero gradients and stays still under step'"
    groups = model.parameter_groups()
    if len(groups) < 2:
        return  # the last group is never frozen: nothing to check
    opt.step(model.loss_and_grad(next(batches))[1])  # optimizer state for every parameter first
    model.set_trainable([False] + [True] * (len(groups) - 1))
    frozen = groups[0]
    before = _host(model.parameters())
    for _ in range(3):
        _, grads = _seeded(hybrid_case, model.loss_and_grad, next(batches))
        assert all(not np.any(_host([grads[i]])[0]) for i in frozen), f"{contract}: a frozen gradient is not zero"
        opt.step(grads)
    after = _host(model.parameters())
    for i in frozen:
        assert np.array_equal(before[i], after[i]), f"{contract}: frozen parameter {i} moved"
    live = [i for g in groups[1:] for i in g]
    assert any(not np.array_equal(before[i], after[i]) for i in live), f"{contract}: the trainable groups did not move"
    model.set_trainable([True] * len(groups))
    opt.step(model.loss_and_grad(next(batches))[1])
    assert any(not np.array_equal(after[i], _host([model.parameters()[i]])[0]) for i in frozen), (
        f"{contract}: set_trainable(True) did not train the group again")


def test_lr_and_an_unmeasured_fused_step_read_nothing_from_the_device_per_step(hybrid_case: ConformanceCase) -> None:
    from hybrid_core import FusedStep

    model, opt, batches, xp = _setup(hybrid_case, seed=9)
    if getattr(opt, "lr_on_device", False) is True:
        return  # the optimizer says reading its rate is a device read (the trainer counts each one)
    contract = ("contract 'unless lr_on_device, Optimizer.lr is a host number and reading it reads no device "
                "per step'")
    fused = isinstance(opt, FusedStep) and opt.model is model
    float(opt.lr)  # a constant may be read from the device once, before the first step
    for k in range(3):
        batch = next(batches)
        with _no_device_reads(xp):
            if fused:  # an unmeasured fused step leaves everything on the device (JAX: checked by a transfer guard)
                opt.fused_step(batch, False)
            lr = opt.lr
        if not fused:
            opt.step(model.loss_and_grad(batch)[1])
        assert isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0, f"{contract}: lr = {lr!r} at step {k}"


def _no_device_reads(xp: Any) -> Any:
    """For JAX arrays: any read of an array's value to the host (``float``/``int``/``bool``/``item``/``__array__``/
    ``jax.device_get``; an uncached ``_value``) raises. On a CPU device ``np.asarray`` can take the buffer directly,
    unseen; so does a transfer guard. Nothing to guard for the other libraries."""
    import contextlib

    if "jax" not in getattr(xp, "__name__", ""):
        return contextlib.nullcontext()
    return _jax_read_trap()


def _jax_read_trap() -> Any:
    import contextlib

    import jax
    import jax.numpy as jnp

    array_type = type(jnp.zeros(()))

    def refuse(what: str) -> Any:
        raise AssertionError(f"a device→host read ({what}) where none was expected")

    @contextlib.contextmanager
    def trap() -> Any:
        saved = {k: array_type.__dict__[k] for k in ("_value", "__array__", "item") if k in array_type.__dict__}
        device_get = jax.device_get
        value = saved.get("_value")
        try:
            if isinstance(value, property):
                array_type._value = property(lambda a: value.fget(a) if a._npy_value is not None else refuse("_value"))
            for name in ("__array__", "item"):
                if name in saved:
                    setattr(array_type, name, lambda a, *args, _n=name, **kw: refuse(_n))
            jax.device_get = lambda *args, **kw: refuse("jax.device_get")
            with jax.transfer_guard_device_to_host("disallow"):
                yield
        finally:
            for name, attr in saved.items():
                setattr(array_type, name, attr)
            jax.device_get = device_get

    return trap()
