"""The core of distributed agreement (`hybrid_core._collective`), with ranks as threads of one process.

Each rank trains a least-squares model on its own data shard, its gradients averaged across ranks as
DDP would; the trainer's reads are agreed through the collective, so the ranks must take every
decision together and end with bit-identical parameters.
"""

from __future__ import annotations

import numpy as np
import pytest
from _threadranks import ThreadCollective, run_ranks
from _toy import LeastSquares, PlainSGD, regression_batches
from hypothesis import given, settings
from hypothesis import strategies as st

from hybrid_core import BackendError, CheckpointError, HybridConfig, HybridTrainer
from hybrid_core._collective import SingleProcess, agree, discover, require_collective

CONFIG = HybridConfig(warmup_steps=10, min_full_steps=5, max_predict_steps=8, check_interval=3,
                      correct_steps=3, confidence_threshold=0.0, use_bandit=False)


class SyncedLeastSquares(LeastSquares):
    """`LeastSquares` whose gradients are averaged over the ranks (what DDP's backward does)."""

    def __init__(self, collective, **kw):
        super().__init__(np, **kw)
        self.collective = collective

    def loss_and_grad(self, batch):
        loss, grads = super().loss_and_grad(batch)
        flat = np.concatenate([np.ravel(g) for g in grads])
        mean = self.collective.all_gather(flat, "gradients").mean(axis=0)
        out, at = [], 0
        for g in grads:
            out.append(mean[at:at + g.size].reshape(g.shape))
            at += g.size
        return loss, out


def _train(collective, steps=120, share_reads=True):
    model = SyncedLeastSquares(collective, dim=3, seed=0)
    trainer = HybridTrainer(model, PlainSGD(model, lr=0.05), CONFIG,
                            collective=collective if share_reads else SingleProcess())
    data = regression_batches(np, seed=100 + collective.rank, noise=0.3)  # each rank its own shard
    for _ in range(steps):
        trainer.step(next(data))
    trainer.flush()
    phases = [r.phase for r in trainer.metrics.records]
    return phases, [p.copy() for p in model.parameters()], trainer


def test_two_ranks_on_different_shards_take_the_same_decisions_and_end_bit_identical():
    results = run_ranks(2, _train)
    assert not any(isinstance(r, BaseException) for r in results), results
    (phases0, params0, t0), (phases1, params1, _) = results
    assert phases0 == phases1
    assert {"predict", "correct"} <= set(phases0)  # prediction really ran, on both ranks together
    for a, b in zip(params0, params1):
        assert np.array_equal(a, b)
    # the recorded losses are the mean over ranks: the same on both
    assert [r.loss for r in t0.metrics.records] == [r.loss for r in results[1][2].metrics.records]


def test_without_agreement_the_ranks_drift_apart_or_fail():
    # The same run with each rank deciding from its own reads: the decisions (or the gradient
    # exchanges) no longer line up. This is what the agreement prevents.
    results = run_ranks(2, lambda c: _train(c, share_reads=False))
    failed = any(isinstance(r, BaseException) for r in results)
    assert failed or results[0][0] != results[1][0] or not all(
        np.array_equal(a, b) for a, b in zip(results[0][1], results[1][1]))


def test_a_rank_at_another_step_is_named_on_every_rank():
    def body(c):
        return agree(c, [1.0], fingerprint=(10 + c.rank, 1, 3), what="read 3")

    results = run_ranks(2, body)
    assert all(isinstance(r, BackendError) for r in results), results
    assert "read 3" in str(results[0]) and "rank 1" in str(results[0])


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.floats(-1e6, 1e6), min_size=3, max_size=3), min_size=2, max_size=3))
def test_agree_is_the_mean_in_rank_order_and_identical_on_every_rank(rows):
    results = run_ranks(len(rows), lambda c: agree(c, rows[c.rank], (1, 2), "read"))
    assert all(r == results[0] for r in results)
    expected = np.array(rows[0], dtype=np.float64)
    for row in rows[1:]:
        expected = expected + np.array(row)
    assert results[0] == (expected / len(rows)).tolist()


def test_a_non_finite_value_on_one_rank_is_non_finite_on_all():
    results = run_ranks(2, lambda c: agree(c, [1.0, float("nan") if c.rank else 2.0], (0,), "read"))
    assert all(np.isnan(r[1]) and r[0] == 1.0 for r in results)


class RankRandom:
    """A per-rank generator as a checkpoint part (thread ranks share the process's global generators)."""

    def __init__(self, seed):
        self.seed = seed

    def state_dict(self):
        return {"state": self.seed}

    def load_state_dict(self, state):
        self.seed = int(state["state"])


def test_save_writes_once_with_every_ranks_random_state_and_each_rank_resumes_its_own(tmp_path):
    path = tmp_path / "ck.msgpack"

    def body(c):
        _, _, trainer = _train(c, steps=30)
        trainer.rng = RankRandom(1000 + c.rank)
        saved = trainer.rng.state_dict()["state"]
        trainer.save(path)
        model = SyncedLeastSquares(c, dim=3, seed=5)
        resumed = HybridTrainer(model, PlainSGD(model, lr=0.05), CONFIG, collective=c)
        resumed.rng = RankRandom(0)
        resumed.restore(path)
        return saved, resumed.rng.state_dict()["state"], resumed.steps_done

    results = run_ranks(2, body)
    assert not any(isinstance(r, BaseException) for r in results), results
    for saved, restored, steps in results:
        assert restored == saved and steps == 30  # each rank got its own generator back
    assert results[0][0] != results[1][0]
    from hybrid_core._persist import read_checkpoint
    raw = read_checkpoint(path)
    assert raw["world_size"] == 2 and len(raw["rng_by_rank"]) == 2


def test_a_failed_write_on_rank_0_is_a_checkpoint_error_on_every_rank(tmp_path):
    def body(c):
        _, _, trainer = _train(c, steps=12)
        trainer.save(tmp_path / "missing-dir" / "ck.msgpack")

    results = run_ranks(2, body)
    assert all(isinstance(r, CheckpointError) for r in results), results
    assert "rank 0" in str(results[1])


def test_bad_collectives_are_refused():
    with pytest.raises(BackendError, match="collective must provide"):
        require_collective(object())

    class Wrong(ThreadCollective):
        def __init__(self):
            self.rank, self.world_size = 2, 2

    with pytest.raises(BackendError, match="rank 2 of world size 2"):
        require_collective(Wrong())


def test_one_process_needs_no_collective():
    assert discover(np).world_size == 1
    assert agree(SingleProcess(), [1.5, 2.0], (1,), "read") == [1.5, 2.0]
    assert isinstance(SingleProcess(), type(require_collective(SingleProcess())))


def test_thread_collective_is_a_collective():
    from _threadranks import Group
    assert require_collective(ThreadCollective(Group(1), 0)).world_size == 1
