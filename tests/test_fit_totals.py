"""`fit`'s length is a total (`max_steps`, `epochs`), and its data position continues across calls and resumes."""

import re

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hybrid_core import CheckpointError, CheckpointPolicy, ConfigError, DivergenceError, HybridConfig, HybridTrainer
from hybrid_core.models import MLP
from hybrid_core.optim import Adam

# Predictions happen (a low threshold), so predicted steps draw batches too.
CONFIG = HybridConfig(warmup_steps=6, min_full_steps=4, max_predict_steps=6, horizon_arms=(0, 3, 6), check_interval=2,
                      correct_steps=2, confidence_threshold=0.0, horizon_ladder=False, read_every=4,
                      lr_recommend=False)


def make(seed=0, config=CONFIG):
    model = MLP([5, 8, 3], dtype=np.float64, seed=seed)
    return HybridTrainer(model, Adam(model, lr=0.02), config), model


def batch(i):
    rng = np.random.default_rng(1000 + i)
    x = rng.normal(size=(12, 5))
    return x, (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0.5).astype(np.int64)


DATA = [batch(i) for i in range(7)]


def params(model):
    return [p.tobytes() for p in model.parameters()]


def stepped(sequence, config=CONFIG):
    """The parameters after `trainer.step` over ``sequence`` (indices into DATA), one by one."""
    trainer, model = make(config=config)
    for i in sequence:
        trainer.step(DATA[i])
    trainer.flush()
    return params(model), trainer


def cycle(n, start=0, length=7):
    return [(start + k) % length for k in range(n)]


# -- totals -----------------------------------------------------------------------------------------------------------


def test_max_steps_is_the_runs_total():
    trainer, _ = make()
    assert trainer.fit(batch, max_steps=30, progress=False)["steps"] == 30
    trainer.fit(batch, max_steps=50, progress=False)
    assert trainer.steps_done == 50
    trainer.fit(batch, max_steps=40, progress=False)  # already past it: nothing
    assert trainer.steps_done == 50
    trainer.fit(batch, steps=5, progress=False)  # steps counts from the call, as before
    assert trainer.steps_done == 55
    trainer.fit(batch, max_steps=np.int64(56), progress=False)  # NumPy integers are integers
    assert trainer.steps_done == 56
    straight, model = make()
    straight.fit(batch, max_steps=56, progress=False)
    assert params(model) == params(trainer.model)


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 5, "max_steps": 10}, "given together"),
    ({"max_steps": -1}, r"max_steps=-1: must be an integer >= 0"),
    ({"max_steps": 2.5}, "max_steps=2.5"),
    ({"max_steps": True}, "max_steps=True"),
    ({"steps": "10"}, "steps='10'"),
    ({"epochs": -2, "max_steps": 3}, "epochs=-2"),
    ({"epochs": 2, "max_steps": 3, "fn": True}, "epochs count passes over an iterable"),
    ({"fn": True}, "max_steps .or steps. is required"),
])
def test_bad_lengths_are_config_errors_before_any_step(kwargs, message):
    trainer, model = make()
    before = params(model)
    source = batch if kwargs.pop("fn", False) else DATA
    with pytest.raises(ConfigError, match=message) as err:
        trainer.fit(source, progress=False, **kwargs)
    assert err.value.recovery or err.value.problems
    assert trainer.steps_done == 0 and params(model) == before


def test_batches_that_are_neither_iterable_nor_a_function():
    trainer, _ = make()
    with pytest.raises(ConfigError, match="batches is a int"):
        trainer.fit(3, max_steps=2, progress=False)


# -- passes over a re-iterable ----------------------------------------------------------------------------------------


def test_max_steps_passes_over_a_list_again_and_counts_epochs():
    trainer, model = make()
    summary = trainer.fit(DATA, max_steps=20, progress=False)
    assert (summary["steps"], summary["epochs"], summary["epoch_batches"]) == (20, 2, 6)
    assert params(model) == stepped(cycle(20))[0]
    at_the_end, _ = make()  # a pass with a length is complete after its last batch
    summary = at_the_end.fit(DATA, max_steps=14, progress=False)
    assert (summary["epochs"], summary["epoch_batches"]) == (2, 0)


def test_epochs_is_a_total_and_the_first_limit_wins():
    trainer, model = make()
    assert trainer.fit(DATA, epochs=2, progress=False)["steps"] == 14
    summary = trainer.fit(DATA, epochs=3, progress=False)
    assert (summary["steps"], summary["epochs"], summary["epoch_batches"]) == (21, 3, 0)
    assert trainer.fit(DATA, epochs=3, progress=False)["steps"] == 21  # there already
    assert trainer.fit(DATA, epochs=10, max_steps=25, progress=False)["steps"] == 25  # max_steps first
    assert trainer.fit(DATA, epochs=4, max_steps=100, progress=False)["steps"] == 28  # epochs first
    assert params(model) == stepped(cycle(28))[0]


def test_without_a_total_a_list_is_trained_to_the_end_of_the_pass():
    trainer, _ = make()
    assert trainer.fit(DATA, progress=False)["steps"] == 7
    trainer.fit(DATA, steps=3, progress=False)
    assert trainer.fit(DATA, progress=False)["steps"] == 14  # the rest of the second pass


def test_a_later_fit_over_the_same_object_continues_its_pass():
    trainer, model = make()
    trainer.fit(DATA, max_steps=10, progress=False)
    assert (trainer.data_position.epoch, trainer.data_position.batch) == (1, 3)
    trainer.fit(DATA, max_steps=25, progress=False)
    straight, twin = make()
    straight.fit(DATA, max_steps=25, progress=False)
    assert params(model) == params(twin)


def test_another_object_starts_a_new_pass_at_its_first_batch():
    trainer, model = make()
    trainer.fit(DATA, max_steps=10, progress=False)  # epoch 1, batch 3
    tail = list(DATA[2:])  # another list: its own pass from its first batch
    summary = trainer.fit(tail, progress=False)
    assert (summary["steps"], summary["epochs"], summary["epoch_batches"]) == (15, 2, 0)
    assert params(model) == stepped([*cycle(10), 2, 3, 4, 5, 6])[0]


def test_a_one_shot_iterator_continues_itself_and_its_end_is_said(capsys):
    trainer, model = make()
    gen = (DATA[i % 7] for i in range(12))
    trainer.fit(gen, steps=5, progress=False)
    summary = trainer.fit(gen, max_steps=20, progress=False)
    assert summary["steps"] == 12 and summary["events"]["batches_ran_out"] == 1
    err = capsys.readouterr().err
    line = [ln for ln in err.splitlines() if "ran out" in ln]
    assert len(line) == 1 and "at step 12" in line[0] and "before max_steps=20" in line[0], err
    assert params(model) == stepped(cycle(12))[0]


def test_a_generator_without_a_total_ends_silently(capsys):
    trainer, _ = make()
    assert trainer.fit((d for d in DATA), progress=False)["steps"] == 7
    assert "ran out" not in capsys.readouterr().err


def test_a_source_that_gives_nothing_stops_instead_of_looping(capsys):
    trainer, _ = make()
    assert trainer.fit([], max_steps=10, progress=False)["steps"] == 0
    assert "no batch in a whole pass" in capsys.readouterr().err


def test_the_progress_text_shows_the_epoch(capsys):
    trainer, _ = make()
    trainer.fit(DATA, epochs=3, progress=True)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("train:")]
    assert lines and all("epoch=" in ln for ln in lines)
    assert "21/21" in lines[-1] and "epoch=3.00/3" in lines[-1]
    fractions = [float(m) for ln in lines for m in re.findall(r"epoch=([0-9.]+)/3", ln)]
    assert fractions == sorted(fractions) and fractions[0] < 3


# -- resuming over a re-iterable --------------------------------------------------------------------------------------


def test_a_loaded_trainer_fast_forwards_the_pass(tmp_path):
    trainer, _ = make()
    trainer.fit(DATA, max_steps=17, progress=False)  # epoch 2, batch 3
    trainer.save(tmp_path / "mid.ckpt")
    model = MLP([5, 8, 3], dtype=np.float64, seed=9)
    resumed = HybridTrainer.load(tmp_path / "mid.ckpt", model, Adam(model, lr=0.02))
    assert (resumed.data_position.epoch, resumed.data_position.batch, resumed.data_position.restored) == (2, 3, True)
    summary = resumed.fit(list(DATA), max_steps=30, progress=False)  # a new process's list: equal, not the same
    assert (summary["epochs"], summary["epoch_batches"]) == (4, 2)
    straight, twin = make()
    straight.fit(DATA, max_steps=30, progress=False)
    assert params(model) == params(twin)


def test_resume_through_fit_says_so_and_ends_at_the_total(tmp_path, capsys):
    policy = CheckpointPolicy(tmp_path / "ckpts", every=8, run_id="totals")
    first, _ = make()
    first.fit(DATA, max_steps=20, progress=False, checkpoint=policy)  # as if killed at step 20
    capsys.readouterr()
    second, model = make(seed=5)  # a new trainer, as in a new process
    summary = second.fit(list(DATA), max_steps=40, progress=False, checkpoint=policy)
    err = capsys.readouterr().err
    assert summary["steps"] == 40 and summary["events"]["resumed"] == 1
    expected = f"hybrid_core: resumed from step 16 (file {tmp_path / 'ckpts' / 'step-000000016-totals.ckpt'})"
    assert expected in err.splitlines(), err
    straight, twin = make()
    straight.fit(DATA, max_steps=40, progress=False)
    assert params(model) == params(twin)


class Augmented:
    """A re-iterable whose batches draw from NumPy's global generator (an augmentation) as they are made."""

    def __iter__(self):
        for x, y in DATA:
            yield x + 0.1 * np.random.standard_normal(x.shape), y

    def __len__(self):
        return len(DATA)


def test_batches_drawn_again_leave_the_random_state_as_the_checkpoint_holds(tmp_path):
    np.random.seed(3)
    straight, twin = make()
    straight.fit(Augmented(), max_steps=25, progress=False)
    np.random.seed(3)
    first, _ = make()
    first.fit(Augmented(), max_steps=11, progress=False)  # epoch 1, batch 4
    first.save(tmp_path / "aug.ckpt")
    np.random.seed(99)  # a new process's generator is elsewhere; the checkpoint puts it back
    model = MLP([5, 8, 3], dtype=np.float64, seed=9)
    resumed = HybridTrainer.load(tmp_path / "aug.ckpt", model, Adam(model, lr=0.02))
    resumed.fit(Augmented(), max_steps=25, progress=False)
    assert params(model) == params(twin)


class ByEpoch:
    """Shuffles by the epoch number it is told (as `DistributedSampler.set_epoch`)."""

    def __init__(self):
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        for i in np.random.default_rng(self.epoch).permutation(len(DATA)):
            yield DATA[i]


def test_set_epoch_is_called_at_every_pass_so_a_resume_draws_the_same_order(tmp_path):
    straight, twin = make()
    source = ByEpoch()
    straight.fit(source, max_steps=30, progress=False)
    assert source.epoch == 4
    first, _ = make()
    first.fit(ByEpoch(), max_steps=17, progress=False)
    first.save(tmp_path / "by-epoch.ckpt")
    model = MLP([5, 8, 3], dtype=np.float64, seed=9)
    resumed = HybridTrainer.load(tmp_path / "by-epoch.ckpt", model, Adam(model, lr=0.02))
    resumed.fit(ByEpoch(), max_steps=30, progress=False)
    assert params(model) == params(twin)


def test_a_one_shot_iterator_cannot_be_fast_forwarded_and_a_resume_warns(tmp_path):
    trainer, _ = make()
    trainer.fit(DATA, max_steps=10, progress=False)
    trainer.save(tmp_path / "gen.ckpt")
    model = MLP([5, 8, 3], dtype=np.float64, seed=9)
    resumed = HybridTrainer.load(tmp_path / "gen.ckpt", model, Adam(model, lr=0.02))
    with pytest.warns(UserWarning, match="one-shot iterator, which cannot be fast-forwarded"):
        resumed.fit((d for d in DATA), max_steps=12, progress=False)
    assert resumed.steps_done == 12 and resumed.data_position.batch == 5


def test_a_position_beyond_the_source_is_a_config_error_before_any_step(tmp_path):
    trainer, _ = make()
    trainer.fit(DATA, max_steps=5, progress=False)
    trainer.save(tmp_path / "five.ckpt")
    model = MLP([5, 8, 3], dtype=np.float64, seed=9)
    resumed = HybridTrainer.load(tmp_path / "five.ckpt", model, Adam(model, lr=0.02))
    before = params(model)
    with pytest.raises(ConfigError, match="batch 5 of epoch 0, but this source's pass ended after 3 batches"):
        resumed.fit(DATA[:3], max_steps=10, progress=False)
    assert resumed.steps_done == 5 and params(model) == before


@pytest.mark.parametrize("state, message", [
    ({"epoch": -1, "batch": 0, "generators": None}, r"epoch=-1"),
    ({"epoch": 0, "batch": "3", "generators": None}, "batch is a str"),
    ({"epoch": 0, "batch": 0}, "lacks generators"),
    ({"epoch": 0, "batch": 0, "generators": [np.zeros(4)]}, r"generators\[0\] is not a 1-D uint8 array"),
])
def test_a_malformed_position_is_refused_and_changes_nothing(tmp_path, state, message):
    from hybrid_core._codec import encode, read_file, write_atomic
    from hybrid_core._persist import _host

    trainer, _model = make()
    trainer.fit(DATA, max_steps=9, progress=False)
    trainer.save(tmp_path / "ok.ckpt")
    doc = read_file(tmp_path / "ok.ckpt")
    doc["parts"]["data"] = state
    write_atomic(tmp_path / "bad.ckpt", encode(doc, _host))
    other, other_model = make(seed=4)
    other.fit(DATA, max_steps=3, progress=False)
    before = (params(other_model), other.data_position.state_dict())
    with pytest.raises(CheckpointError, match=f"part 'data'.*{message}"):
        other.restore(tmp_path / "bad.ckpt")
    assert params(other_model) == before[0] and other.data_position.state_dict() == before[1]


# -- a step that raises ------------------------------------------------------------------------------------------------


def test_a_step_undone_by_an_error_is_not_counted_and_is_fed_again():
    config = CONFIG.replace(read_every=8, confidence_threshold=1.0)  # no predictions: every step reads its batch
    bad = list(DATA)
    bad[5] = (np.full_like(DATA[5][0], np.nan), DATA[5][1])
    trainer, _ = make(config=config)
    with pytest.raises(DivergenceError):
        trainer.fit(bad, max_steps=20, progress=False)
    assert trainer.steps_done == 5  # the lagged read found it at step 7: steps 5 and 6 were undone
    assert (trainer.data_position.epoch, trainer.data_position.batch) == (0, 5)
    with pytest.raises(DivergenceError, match="step 5"):  # the same batch again
        trainer.fit(bad, max_steps=20, progress=False)
    assert trainer.data_position.batch == 5



def test_a_shuffled_dataloader_with_a_seeded_generator_resumes_its_order(tmp_path):
    torch = pytest.importorskip("torch")
    from hybrid_core.adapters.torch import TorchModel, TorchOptimizer

    points = torch.randn(40, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def setup():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1)).double()
        model = TorchModel(net, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(points, points[:, :1] * points[:, 1:2]),
                                             batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
        opt = TorchOptimizer(model, torch.optim.Adam(net.parameters(), lr=1e-2))
        return HybridTrainer(model, opt, CONFIG), loader, net

    straight, loader, net = setup()
    straight.fit(loader, max_steps=47, progress=False)
    first, loader, _ = setup()
    first.fit(loader, max_steps=26, progress=False)  # epoch 2, batch 6 of 10
    first.save(tmp_path / "loader.ckpt")
    again, loader, again_net = setup()
    again.restore(tmp_path / "loader.ckpt")
    summary = again.fit(loader, max_steps=47, progress=False)
    assert (summary["epochs"], summary["epoch_batches"]) == (4, 7)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), again_net.parameters()))


# -- the invariant, property-tested -----------------------------------------------------------------------------------

FAST = CONFIG.replace(read_every=2)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(length=st.integers(1, 5), totals=st.lists(st.integers(0, 17), min_size=1, max_size=4),
       breaks=st.lists(st.sampled_from(["continue", "save-load", "new-object"]), min_size=4, max_size=4))
@example(length=2, totals=[1, 1, 2], breaks=["continue", "new-object", "continue", "continue"])
def test_a_run_cut_anywhere_trains_on_what_one_fit_trains_on(tmp_path_factory, length, totals, breaks):
    """``fit(source, max_steps=t)`` for rising totals, with a save and load into a new trainer, or another equal
    list, between calls, trains on the batches the model below says, in that order (the parameters are
    bit-identical to stepping through them): the same object, or any object after a load, continues the pass;
    another object in the same process starts a new pass at its first batch (also when the call that gave it had
    no step left to take)."""
    data = DATA[:length]
    totals = sorted(totals)
    trainer, _ = make(config=FAST)
    source = list(data)
    ckpt = tmp_path_factory.mktemp("cut") / "cut.ckpt"
    expected: list[int] = []
    loaded, epoch, batch = False, 0, 0  # the model's view of the data position
    unseen = False  # a new object the trainer has not taken a batch from yet (it starts a new pass)
    for total, how in zip(totals, breaks):
        start = trainer.steps_done
        if how == "new-object":
            source, unseen = list(data), True
        if start < total:
            if unseen and not loaded:
                batch = 0
            expected += cycle(total - start, batch, length)
            epoch, batch = epoch + (batch + total - start) // length, (batch + total - start) % length
            loaded = unseen = False
        trainer.fit(source, max_steps=total, progress=False)
        assert (trainer.data_position.epoch, trainer.data_position.batch) == (epoch, batch)
        if how == "save-load":
            trainer.save(ckpt)
            model = MLP([5, 8, 3], dtype=np.float64, seed=7)
            trainer = HybridTrainer.load(ckpt, model, Adam(model, lr=0.02))
            loaded = True
    assert params(trainer.model) == stepped(expected, config=FAST)[0]
    assert trainer.steps_done == len(expected)


def test_a_checkpoint_from_before_the_data_and_callbacks_parts_loads(tmp_path):
    from hybrid_core._codec import encode, read_file, write_atomic
    from hybrid_core._persist import _host

    trainer, _ = make()
    trainer.fit(DATA, max_steps=10, progress=False)
    trainer.save(tmp_path / "now.ckpt")
    doc = read_file(tmp_path / "now.ckpt")
    del doc["parts"]["data"], doc["parts"]["callbacks"]
    write_atomic(tmp_path / "older.ckpt", encode(doc, _host))
    model = MLP([5, 8, 3], dtype=np.float64, seed=9)
    older = HybridTrainer.load(tmp_path / "older.ckpt", model, Adam(model, lr=0.02))
    assert older.steps_done == 10 and older.data_position.state_dict() == {"epoch": 0, "batch": 0, "generators": None}
    assert older.callback_states.waiting == [] and older.fit(DATA, max_steps=12, progress=False)["steps"] == 12
