"""Flat parameter buffers (kernels._flat), the in-place fused_axpy_ and the bench-kernels --axpy-layouts report."""

import json
import statistics

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybrid_core import BackendError, ConfigError, HybridError, ModelError
from hybrid_core.apps.cli import main
from hybrid_core.apps.kernels_bench import AXPY_METHODS, format_layouts, run_axpy_layouts
from hybrid_core.kernels import fused_axpy, fused_axpy_, reference

torch = pytest.importorskip("torch")

from hybrid_core.kernels import FlatTensors, flatten, flatten_module_  # noqa: E402  (imports torch)
from hybrid_core.kernels._flat import same_layout  # noqa: E402

SHAPES = [(3, 4), (1,), (), (0,), (5,), (2, 0, 3), (7, 1, 2)]
shapes_st = st.lists(st.one_of(st.just(()), st.tuples(st.integers(0, 9)),
                               st.tuples(st.integers(1, 5), st.integers(1, 5)),
                               st.just((1,)), st.just((1, 1))),
                     min_size=1, max_size=12)


def randoms(shapes, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]


def expected_axpy(params, direction, scale):
    """The reference (out of place) on independent copies."""
    return reference.fused_axpy([p.detach().clone() for p in params], [d.detach().clone() for d in direction], scale)


def assert_close_lists(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


# -- flatten ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.int64])
def test_flatten_round_trip_values_shapes_dtypes(dtype):
    src = [t.to(dtype) for t in randoms(SHAPES, 0, torch.float64)]
    flat = flatten(src)
    assert isinstance(flat, FlatTensors) and isinstance(flat, list) and len(flat) == len(src)
    assert flat.base.ndim == 1 and flat.base.is_contiguous() and flat.base.dtype == dtype
    assert flat.base.numel() == sum(t.numel() for t in src)
    for view, t in zip(flat, src):
        assert view.shape == t.shape and view.dtype == dtype
        assert torch.equal(view, t)
        assert view.data_ptr() != t.data_ptr() or t.numel() == 0  # a copy, not the source
    assert torch.equal(flat.base, torch.cat([t.reshape(-1) for t in src]))  # in order
    assert flat.intact(full=True)


def test_views_share_storage_with_base():
    flat = flatten(randoms(SHAPES, 1))
    storage = flat.base.untyped_storage().data_ptr()
    assert all(v.untyped_storage().data_ptr() == storage for v in flat)
    flat.base.fill_(2.5)
    assert all(bool((v == 2.5).all()) for v in flat)
    flat[0].zero_()
    assert float(flat.base[: flat[0].numel()].abs().sum()) == 0.0
    assert float(flat.base[flat[0].numel():].min()) == 2.5


def test_equal_shapes_share_one_layout_and_flatten_can_cast():
    a, b = flatten(randoms(SHAPES, 2)), flatten(randoms(SHAPES, 3, torch.float64))
    assert a.layout is b.layout and same_layout(a, b)
    mixed = flatten([torch.ones(2), torch.ones(3, dtype=torch.float64)], dtype=torch.float64)
    assert mixed.base.dtype == torch.float64 and mixed[1].tolist() == [1.0, 1.0, 1.0]
    assert flatten([]).base.numel() == 0 and list(flatten([])) == []


def test_flatten_rejects_mixed_dtypes_devices_and_non_tensors():
    with pytest.raises(BackendError, match="one dtype"):
        flatten([torch.ones(2), torch.ones(2, dtype=torch.float64)])
    with pytest.raises(BackendError, match="one device"):
        flatten([torch.ones(2), torch.ones(2, device="meta")])
    with pytest.raises(BackendError, match="torch tensors"):
        flatten([torch.ones(2), np.ones(2)])


def test_flat_list_is_fixed_but_copies_are_plain_lists():
    flat = flatten(randoms([(2,), (3,)], 4))
    for edit in (lambda f: f.append(torch.ones(1)), lambda f: f.__setitem__(0, torch.ones(2)), lambda f: f.pop(),
                 lambda f: f.extend([]), lambda f: f.clear(), lambda f: f.__delitem__(0)):
        with pytest.raises(ModelError, match="fixed"):
            edit(flat)
    plain = list(flat)
    plain.append(torch.ones(1))
    assert type(plain) is list and len(flat) == 2


# -- flatten_module_ ----------------------------------------------------------------------------------------


def test_flatten_module_keeps_the_module_trainable_with_adam():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    before = [p.detach().clone() for p in model.parameters()]
    identities = [id(p) for p in model.parameters()]
    flat = flatten_module_(model)
    assert [id(p) for p in flat] == identities and [id(p) for p in model.parameters()] == identities
    assert all(p.requires_grad and isinstance(p, torch.nn.Parameter) for p in flat)
    assert all(torch.equal(p, b) for p, b in zip(flat, before))
    assert flat.intact(full=True)

    x = torch.randn(64, 4)
    y = x.sum(dim=1, keepdim=True).sin()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert flat.intact(full=True)  # still views of the one buffer after the optimizer's in-place steps
    assert torch.equal(flat.base, torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert set(model.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}

    # an update through the buffer moves the module's parameters
    direction = flatten([torch.ones_like(p) for p in flat])
    w = model[0].weight.detach().clone()
    fused_axpy_(flat, direction, 0.25)
    torch.testing.assert_close(model[0].weight.detach(), w + 0.25)


def test_moving_a_parameter_out_of_the_buffer_is_noticed():
    model = torch.nn.Linear(3, 2)
    flat = flatten_module_(model)
    model.bias.data = model.bias.detach().clone()  # rebinding .data: no longer in the buffer
    assert not flat.intact()
    direction = flatten([torch.ones_like(p) for p in flat])
    assert not same_layout(flat, direction)
    b = model.bias.detach().clone()
    fused_axpy_(flat, direction, 1.0)  # falls back to the per-tensor path: still correct
    torch.testing.assert_close(model.bias.detach(), b + 1)


# -- fused_axpy_ ------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(shapes=shapes_st, seed=st.integers(0, 2**16), scale=st.floats(-4, 4, width=32),
       flat_params=st.booleans(), flat_direction=st.booleans(), cast=st.booleans())
def test_fused_axpy_in_place_matches_the_reference(shapes, seed, scale, flat_params, flat_direction, cast):
    params = randoms(shapes, seed)
    direction = randoms(shapes, seed + 1, torch.float64 if cast else torch.float32)
    want = expected_axpy(params, direction, scale)
    params = flatten(params) if flat_params else params
    direction = flatten(direction) if flat_direction else direction
    ids = [id(p) for p in params]
    assert fused_axpy_(params, direction, scale) is params
    assert [id(p) for p in params] == ids  # in place: the same tensor objects
    assert_close_lists(list(params), want)
    if flat_params:
        assert params.intact(full=True)


@settings(max_examples=30, deadline=None)
@given(shapes=shapes_st, seed=st.integers(0, 2**16), scale=st.floats(-4, 4, width=32), flat=st.booleans())
def test_fused_axpy_out_of_place_keeps_its_behaviour(shapes, seed, scale, flat):
    params, direction = randoms(shapes, seed), randoms(shapes, seed + 1)
    want = expected_axpy(params, direction, scale)
    if flat:
        params, direction = flatten(params), flatten(direction)
    before = [p.clone() for p in params]
    got = fused_axpy(params, direction, scale)
    assert_close_lists(got, want)
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # inputs untouched
    if flat:
        assert isinstance(got, FlatTensors) and got.layout is params.layout and got.intact(full=True)
        assert got.base.numel() == 0 or got.base.data_ptr() != params.base.data_ptr()  # empty: no storage


def test_one_element_and_self_aliasing():
    p = flatten([torch.tensor([2.0]), torch.tensor(3.0)])
    fused_axpy_(p, p, 0.5)  # θ += 0.5·θ
    assert p[0].tolist() == [3.0] and p[1].item() == 4.5
    q = [torch.tensor([2.0])]
    fused_axpy_(q, [torch.tensor([1.0])], -2.0)
    assert q[0].tolist() == [0.0]


def test_layout_mismatch_falls_back():
    params = flatten(randoms([(4,), (2, 3)], 5))
    other = flatten(randoms([(2, 2), (6,)], 6))  # same element count, other shapes
    assert not same_layout(params, other)
    with pytest.raises(ModelError, match="shapes differ"):
        fused_axpy_(params, other, 1.0)
    plain = randoms([(4,), (2, 3)], 7)
    want = expected_axpy(params, plain, 0.5)
    fused_axpy_(params, plain, 0.5)  # FlatTensors + a plain list: foreach on the views
    assert_close_lists(list(params), want)
    separate = randoms([(4,), (2, 3)], 8)
    want = expected_axpy(separate, params, -1.0)
    fused_axpy_(separate, params, -1.0)  # plain params + FlatTensors direction
    assert_close_lists(separate, want)


def test_forcing_an_implementation_skips_the_flat_path_out_of_place(monkeypatch):
    params, direction = flatten(randoms([(3,), (2, 2)], 9)), flatten(randoms([(3,), (2, 2)], 10))
    monkeypatch.setenv("HYBRID_KERNELS", "reference")
    got = fused_axpy(params, direction, 2.0)
    assert type(got) is list
    assert_close_lists(got, expected_axpy(params, direction, 2.0))


def test_fused_axpy_in_place_on_parameters_that_require_grad():
    p = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.ones(2, 2))]
    fused_axpy_(p, [torch.ones(3), torch.ones(2, 2)], 2.0)
    assert p[0].tolist() == [2.0, 2.0, 2.0] and p[1].requires_grad and p[1].is_leaf


def test_fused_axpy_in_place_reference_on_numpy_and_array_api_strict():
    params = [np.zeros(3, dtype=np.float32), np.ones((2, 2)), np.asarray(1.0)]
    views = list(params)
    fused_axpy_(params, [np.ones(3), np.ones((2, 2), dtype=np.float32), np.asarray(2.0)], 0.5)
    assert all(a is b for a, b in zip(params, views))
    assert params[0].dtype == np.float32 and params[0].tolist() == [0.5] * 3
    assert params[1].tolist() == [[1.5, 1.5], [1.5, 1.5]] and float(params[2]) == 2.0
    xps = pytest.importorskip("array_api_strict")
    strict = [xps.zeros(3), xps.ones((2,))]
    fused_axpy_(strict, [xps.ones(3), xps.ones((2,))], 3.0)
    assert np.asarray(strict[0]).tolist() == [3.0] * 3 and np.asarray(strict[1]).tolist() == [4.0, 4.0]


def test_fused_axpy_in_place_bad_inputs_raise_hybrid_errors():
    with pytest.raises(ModelError, match="1 arrays for 2"):
        fused_axpy_([torch.ones(2), torch.ones(2)], [torch.ones(2)], 1.0)
    with pytest.raises(ModelError, match="shapes differ"):
        fused_axpy_([torch.ones(3)], [torch.ones(1)], 1.0)  # torch would broadcast this
    with pytest.raises(ModelError, match="shapes differ"):
        fused_axpy_([np.ones(3)], [np.ones(1)], 1.0)
    with pytest.raises(BackendError, match="torch tensors"):
        fused_axpy_([torch.ones(2)], [np.ones(2)], 1.0)
    with pytest.raises(BackendError, match="read-only"):
        frozen = np.ones(2)
        frozen.flags.writeable = False
        fused_axpy_([np.ones(2), frozen], [np.ones(2), np.ones(2)], 1.0)
    with pytest.raises(BackendError, match="on cpu and directions on meta"):
        fused_axpy_([torch.ones(2)], [torch.ones(2, device="meta")], 1.0)
    jnp = pytest.importorskip("jax.numpy")
    with pytest.raises(BackendError, match="immutable"):
        fused_axpy_([jnp.ones(2)], [jnp.ones(2)], 1.0)
    assert fused_axpy_([], [], 1.0) == []
    assert issubclass(BackendError, HybridError) and issubclass(ModelError, HybridError)


# -- the layout report -----------------------------------------------------------------------------------------


def test_axpy_layout_bench_runs_tiny_and_is_consistent():
    rows = run_axpy_layouts(3000, (3, 30, 300), repeat=3)
    assert [(r.tensors, r.method) for r in rows] == [(k, m) for k in (3, 30, 300) for m in AXPY_METHODS]
    for k in (3, 30, 300):
        group = {r.method: r for r in rows if r.tensors == k}
        limit = group[AXPY_METHODS[0]]
        assert limit.elements == 3000 // k and limit.ratios == (1.0, 1.0, 1.0)
        for r in group.values():
            assert len(r.samples_ms) == len(r.ratios) == 3
            assert all(np.isfinite(t) and t > 0 for t in r.samples_ms)
            assert r.median_ms == statistics.median(r.samples_ms)
            assert r.ratios == pytest.approx([t / lim for t, lim in zip(r.samples_ms, limit.samples_ms)])
            assert r.median_ratio == statistics.median(r.ratios) and r.median_ratio > 0
    text = format_layouts(rows)
    assert "300 x 10" in text and "vs limit" in text and AXPY_METHODS[1] in text
    with pytest.raises(ConfigError, match="between 1 and"):
        run_axpy_layouts(10, (20,), repeat=1)


def test_bench_kernels_axpy_layouts_command(tmp_path, capsys):
    out = tmp_path / "layouts.json"
    assert main(["bench-kernels", "--axpy-layouts", "--axpy-total", "2k", "--axpy-counts", "2", "20",
                 "--repeat", "2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "limit: add_ on one flat buffer" in text and "20 x 100" in text
    doc = json.loads(out.read_text())
    assert len(doc["axpy_layouts"]) == 2 * len(AXPY_METHODS) and doc["machine"]["torch_threads"] >= 1
    assert main(["bench-kernels", "--axpy-layouts", "--axpy-total", "10", "--axpy-counts", "11"]) == 2
