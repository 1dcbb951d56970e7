"""What `TorchModel` does with a batch: moves it to the model's device (switchable), cuts it into the
micro-batches of gradient accumulation, and runs forward checks in eval mode by default."""

import collections
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch", reason="the torch adapter needs torch")

from hybrid_core import BackendError, BatchError, ConfigError, HybridConfig, HybridTrainer  # noqa: E402
from hybrid_core.adapters._torch_batch import split_batch  # noqa: E402
from hybrid_core.adapters.torch import TorchModel, TorchOptimizer  # noqa: E402

F = torch.nn.functional
Pair = collections.namedtuple("Pair", "x y")


def _net(seed=0, device="cpu"):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double().to(device)


def _batch(seed, n=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randn(n, 3, generator=g, dtype=torch.float64)


def _mse(module, batch):
    x, y = batch
    return F.mse_loss(module(x), y)


# -- moving batches to the model's device ----------------------------------------------------------------------


def _recording(seen):
    def loss_fn(module, batch):
        seen.append(batch)
        return _mse(module, (batch["x"], batch["pair"].y) if isinstance(batch, dict) else batch)
    return loss_fn


def test_a_batch_already_on_the_models_device_is_passed_as_is():
    for move in (True, False):
        seen = []
        model = TorchModel(_net(), _recording(seen), move_batch=move)
        batch = _batch(0)
        model.loss(batch)
        model.loss_and_grad(batch)
        assert all(b is batch for b in seen)  # the same object: no copy, no rebuilt tuple


def test_move_batch_moves_every_tensor_to_the_models_device_and_keeps_the_containers():
    seen = []
    model = TorchModel(_net(device="meta"), _recording(seen))  # a device other than the batch's cpu
    assert model.move_batch and model.device == torch.device("meta")
    x, y = _batch(0)
    batch = {"x": x, "pair": Pair(x, y), "ids": [torch.arange(3)], "name": "digits"}
    loss = model.loss(batch)
    assert loss.device.type == "meta"
    got = seen[0]
    assert type(got["pair"]) is Pair and got["name"] == "digits" and isinstance(got["ids"], list)
    assert {t.device.type for t in (got["x"], got["pair"].x, got["pair"].y, got["ids"][0])} == {"meta"}
    assert batch["x"].device.type == "cpu"  # the caller's batch is not changed
    _, grads = model.loss_and_grad(batch)
    assert {g.device.type for g in grads} == {"meta"}


def test_a_module_on_several_devices_gets_no_move():
    net = torch.nn.Sequential(torch.nn.Linear(4, 3).double(), torch.nn.Linear(3, 3).double().to("meta"))
    seen = []
    model = TorchModel(net, lambda m, b: seen.append(b) or m[0](b[0]).sum())
    assert model.device is None
    batch = _batch(0)
    model.loss(batch)
    assert seen[0] is batch
    with pytest.raises(ConfigError, match="span several devices"):
        TorchModel(net, _mse, autocast=torch.bfloat16)


def test_without_move_batch_a_batch_on_another_device_is_a_backend_error():
    model = TorchModel(_net(device="meta"), _mse, move_batch=False)
    with pytest.raises(BackendError, match="cpu but the model is on meta") as err:
        model.loss(_batch(0))
    assert "tensor.to(device)" in err.value.recovery


@pytest.mark.parametrize("move", [True, False])
def test_a_batch_on_the_meta_device_is_a_clear_backend_error_and_changes_nothing(move):
    model = TorchModel(_net(), _mse, move_batch=move)
    opt = TorchOptimizer(model, torch.optim.Adam(model.parameters(), lr=1e-2))
    trainer = HybridTrainer(model, opt, HybridConfig(warmup_steps=5, min_full_steps=5))
    trainer.step(_batch(0))
    before = [p.detach().clone() for p in model.parameters()]
    x, y = _batch(1)
    for call in (model.loss, model.loss_and_grad, trainer.step):
        with pytest.raises(BackendError, match="meta device \\(no data\\)" if move else "on meta but") as err:
            call((x.to("meta"), y))
        assert err.value.recovery
    assert trainer.steps_done == 1
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


def test_a_tensor_torch_cannot_move_is_a_backend_error():
    model = TorchModel(_net(device="meta"), _mse)
    x, y = _batch(0)

    def refuse(*args, **kwargs):
        raise RuntimeError("no route to that device")

    x.to = refuse
    with pytest.raises(BackendError, match="cannot be moved to meta: no route") as err:
        model.loss((x, y))
    assert "yourself" in err.value.recovery


# -- gradient accumulation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [32, 30])  # 30: micro-batches of 8, 8, 7, 7
def test_accumulating_4_micro_batches_equals_one_step_on_the_whole_batch(n):
    sizes = []
    whole, micro = TorchModel(_net(), _mse), TorchModel(_net(), _mse, accumulate=4)
    micro.module[0].register_forward_hook(lambda m, inputs, out: sizes.append(inputs[0].shape[0]))
    batch = _batch(0, n)
    loss_w, grads_w = whole.loss_and_grad(batch)
    loss_m, grads_m = micro.loss_and_grad(batch)
    assert sizes == [8, 8, 8, 8] if n == 32 else [8, 8, 7, 7]
    torch.testing.assert_close(loss_m, loss_w, rtol=1e-12, atol=0)
    for a, b in zip(grads_m, grads_w, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(micro.loss(batch), whole.loss(batch), rtol=1e-12, atol=0)
    # One optimizer step per batch, fused path (as in the trainer) and unfused alike.
    opts = [TorchOptimizer(m, torch.optim.Adam(m.parameters(), lr=1e-2)) for m in (whole, micro)]
    for step in range(3):
        stats = [opt.fused_step(_batch(step, n), True)[1] for opt in opts]
        torch.testing.assert_close(stats[0], stats[1], rtol=1e-9, atol=1e-14)
    for a, b in zip(whole.parameters(), micro.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert all(s["step"] == 3 for s in opts[1].optimizer.state.values())


def test_the_trainer_counts_optimizer_steps_under_accumulation():
    model = TorchModel(_net(), _mse, accumulate=4)
    forwards = []
    model.module[0].register_forward_hook(lambda m, inputs, out: forwards.append(inputs[0].shape[0]))
    opt = TorchOptimizer(model, torch.optim.Adam(model.parameters(), lr=1e-2))
    trainer = HybridTrainer(model, opt, HybridConfig(warmup_steps=100, min_full_steps=10))
    trainer.fit([_batch(i) for i in range(12)], progress=False)
    assert trainer.steps_done == 12 and trainer.summary()["backward_passes"] == 12
    assert forwards == [8] * 48  # four micro-batches of each batch of 32
    assert [int(s["step"]) for s in opt.optimizer.state.values()] == [12] * len(model.parameters())


def test_micro_batches_need_one_number_of_examples():
    model = TorchModel(_net(), lambda m, b: _mse(m, (b[0], b[1])), accumulate=2)
    x, y = _batch(0)
    with pytest.raises(BatchError, match=r"\[16, 32\]"):
        model.loss_and_grad((x, y, torch.zeros(16)))
    loss, _ = model.loss_and_grad((x, y, torch.tensor(3.0)))  # a 0-d tensor goes whole into each micro-batch
    assert math.isfinite(float(loss))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 6))
def test_split_batch_covers_the_batch_once_with_weights_summing_to_one(n, parts):
    x = torch.arange(n * 2, dtype=torch.float64).reshape(n, 2)
    batch = {"x": x, "meta": (torch.tensor(7.0), "tag")}
    pieces = split_batch(batch, parts)
    assert len(pieces) == min(parts, n)
    assert math.isclose(sum(w for w, _ in pieces), 1.0)
    assert torch.equal(torch.cat([m["x"] for _, m in pieces]), x)
    for weight, micro in pieces:
        assert weight == micro["x"].shape[0] / n and micro["meta"][1] == "tag"
    assert max(m["x"].shape[0] for _, m in pieces) - min(m["x"].shape[0] for _, m in pieces) <= 1


# -- forward checks in eval mode by default -----------------------------------------------------------------------


def test_a_dropout_models_forward_checks_are_deterministic_by_default_in_the_trainer():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.ReLU(), torch.nn.Dropout(0.5),
                              torch.nn.Linear(32, 3)).double()
    model = TorchModel(net, _mse)
    config = HybridConfig(warmup_steps=10, min_full_steps=5, confidence_threshold=0.0, idle_after=0,
                          horizon_arms=(0, 5), max_predict_steps=5, probe_steps=2, check_interval=1, correct_steps=2)
    trainer = HybridTrainer(model, TorchOptimizer(model, torch.optim.Adam(net.parameters(), lr=1e-3)), config)
    checks = []
    original = model.loss

    def recording_loss(batch):
        out = original(batch)
        checks.append((out, original(batch), net.training))
        return out

    model.loss = recording_loss
    trainer.fit(lambda i: _batch(i % 3), steps=40, progress=False)
    assert len(checks) > 3
    assert all(torch.equal(a, b) for a, b, _ in checks)  # the same weights and batch: the same loss
    assert all(training for *_, training in checks) and net.training  # the module's mode is put back
    noisy = TorchModel(net, _mse, eval_for_loss=False)
    assert not torch.equal(noisy.loss(_batch(0)), noisy.loss(_batch(0)))
    assert np.isfinite(float(model.loss(_batch(0))))
