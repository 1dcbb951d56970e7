"""`HybridTrainer`: one step path through the phase machine, composed of parts that own their state."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import array_api_compat

from ._backend import library_name, namespace_of
from ._bandit import LinUCBBandit
from ._batchcheck import BatchCheck
from ._cadence import Cadence
from ._callbackstate import CallbackStates
from ._checks import call_model, check_loss_and_grads, has_method, require_protocol
from ._codec import DEFAULT_MAX_BYTES
from ._collective import Collective, discover, require_collective
from ._config import HybridConfig
from ._corrector import ResidualCorrector, ResidualStore
from ._cycle import PredictionCycle
from ._directions import make_direction
from ._errors import ConfigError, ModelError
from ._evaluation import export_parameters, readout_swapped_in
from ._features import CONTEXT_NAMES
from ._freeze import LayerFreeze
from ._ledger import Ledger
from ._loop import Callback
from ._loop import fit as run_fit
from ._lrtune import LRTuner
from ._metrics import MetricsCollector, StepRecord
from ._monitor import DivergenceMonitor
from ._persist import (
    CheckpointPolicy,
    ModelState,
    Part,
)
from ._phase import Phase, PhaseMachine, PhaseState, Signals
from ._position import DataPosition
from ._predictor import Predictor
from ._protocols import Array, DynamicsModel, Model, Optimizer
from ._readout import ReadOut
from ._realsteps import RealSteps
from ._recorder import Recorder
from ._result import StepResult
from ._rng import GlobalRandomState
from ._rundir import new_run_id, run_id_problem
from ._runinfo import load_trainer, restore_trainer, save_trainer, start_lr
from ._schedule import advance_schedule, require_room
from ._state import TrainingState
from .dynamics import TrendDynamics

__all__ = ["HybridTrainer", "StepResult"]


class HybridTrainer:
    """Trains ``model`` with ``optimizer``, predicting some steps instead of computing them.

    Real steps (WARMUP, FULL, CORRECT) run forward + backward + optimizer step (in one call
    when the optimizer offers `FusedStep`) and leave their loss on the device; every
    ``config.read_every`` steps, and before each decision, the pending values are read in one
    transfer, and the statistics of that step are measured too. Read values teach
    ``dynamics`` the loss trajectory (default `TrendDynamics`, Holt smoothing of the log-loss). In
    FULL a LinUCB bandit picks the next PREDICT horizon, 0 (keep training normally) included.
    A PREDICT step runs no backward pass: it applies ``step_scale · direction`` and every
    ``check_interval`` steps a forward-only check compares the loss with the predicted band;
    leaving it rolls back to the last good point. CORRECT line-searches how much of the
    predicted displacement to keep, then runs real steps whose residuals train a corrector;
    the cycle's reward teaches the bandit. When predicting cannot pay (confidence stays low,
    or every horizon tried lost) the trainer idles for ``idle_steps``: it reads the loss only.

    A non-finite value found by a read rolls the model and optimizer back to the last read
    that was all finite and replays the steps since from their kept batches, reading each, so
    the failing step is handled as if it had been read at once (`DivergenceError`, or skipped).
    `host_syncs` counts every device→host read. In a run of several processes (torch DDP, multi-process
    JAX) every read is agreed among the ranks, so all take the same decisions (``collective``).

    Parts (each with ``state_dict``/``load_state_dict``; a checkpoint is ``{name: state}``):
    see `parts`.
    """

    def __init__(self, model: Model, optimizer: Optimizer, config: HybridConfig | None = None,
                 dynamics: DynamicsModel | None = None, *, collective: Collective | None = None) -> None:
        config = HybridConfig() if config is None else config
        if not isinstance(config, HybridConfig):
            raise ConfigError(f"config must be a HybridConfig, got {type(config).__name__}")
        require_protocol(model, Model, "model")
        require_protocol(optimizer, Optimizer, "optimizer")
        dynamics = TrendDynamics() if dynamics is None else dynamics
        require_protocol(dynamics, DynamicsModel, "dynamics")
        params = list(model.parameters())
        if not params:
            raise ModelError("model.parameters() is empty: nothing to train")
        self._xp = namespace_of(params, what="model.parameters()")
        for i, p in enumerate(params):
            if array_api_compat.size(p) == 0:
                raise ModelError(f"parameter {i} has shape {tuple(p.shape)} with no elements",
                                 "Remove zero-size parameters from Model.parameters().")
        self.model = model
        self.optimizer = optimizer
        self.config = config
        self.dynamics = dynamics
        self.state = TrainingState(config.history_size)
        self.metrics = MetricsCollector(config.metrics_max_records)
        self.monitor = DivergenceMonitor(config.divergence_sigma, config.explode_ratio)
        arms = [a for a in config.horizon_arms if a <= config.max_predict_steps]
        self.bandit = LinUCBBandit(arms, len(CONTEXT_NAMES), alpha=config.bandit_alpha, ladder=config.horizon_ladder)
        self.residuals = ResidualStore()
        self.corrector = ResidualCorrector(len(CONTEXT_NAMES))
        self.directions = make_direction(config.direction, config.linefit_snapshots, config.linefit_spacing)
        self.phases = PhaseMachine(config)
        self.cycle = PredictionCycle(config)
        self.cadence = Cadence(config)
        self.ledger = Ledger(self._xp)
        self.collective = discover(self._xp) if collective is None else require_collective(collective)
        """The run's processes (docs/distributed.md): found from the engine unless given; every read is agreed."""
        self.ledger.collective = self.collective
        self.ledger.fingerprint = lambda: (self.steps_done, list(Phase).index(self.phase), self.ledger.host_syncs)
        self.rng = GlobalRandomState()
        self.readout = ReadOut(config, model)
        self.batch_check = BatchCheck()
        self.data_position = DataPosition()
        """Where `fit` is in its data (passes and batches over a re-iterable); a checkpoint part."""
        self.callback_states = CallbackStates()
        """The state of the callbacks attached by the last `fit` (or ``callback_states.attach``); a checkpoint part."""
        self._probe: tuple[int, list[str]] | None = None
        self.lr_tuner = LRTuner(config, optimizer)
        tuner = self.lr_tuner
        self.freeze = LayerFreeze(config, model, optimizer)
        self.recorder = Recorder(config, self.state, self.cadence, self.cycle, self.monitor, self.residuals,
                                 self.corrector, dynamics, self.metrics,
                                 sum(int(array_api_compat.size(p)) for p in params),
                                 lambda: tuner.lr if tuner.enabled else None)
        self.real_steps = RealSteps(config, model, optimizer, self.ledger, self.recorder, self.directions,
                                    self.phases, self.metrics, self._xp, self.readout, self.lr_tuner, self.freeze,
                                    self.cycle)
        self.predictor = Predictor(config, model, optimizer, self.state, self.cycle, self.recorder, dynamics,
                                   self.corrector, self.bandit, self.monitor, self.metrics, self.ledger,
                                   self.directions, self.freeze, self.batch_check, self._forward, self.flush,
                                   self.cadence)
        self.ledger.verify(model, optimizer)
        self._run_id = new_run_id()
        self.run_lr = start_lr(optimizer)
        """The optimizer's learning rate when the run started (None if not a readable number); kept in checkpoints."""

    # -- public views --------------------------------------------------------------------------

    @property
    def phase(self) -> Phase:
        """The phase the next step will run in."""
        return self.phases.state.phase

    @property
    def phase_state(self) -> PhaseState:
        """The phase, steps done in it and the PREDICT horizon in force."""
        return self.phases.state

    @property
    def xp(self) -> Any:
        """The array namespace of the model's parameters."""
        return self._xp

    @property
    def host_syncs(self) -> int:
        """Device→host reads so far (losses and statistics in batches, checks, line searches)."""
        return self.ledger.host_syncs

    @property
    def steps_done(self) -> int:
        """Steps taken so far, read or still pending."""
        return self.state.step + len(self.ledger.pending)

    @property
    def run_id(self) -> str:
        """The id of the run this trainer continues: fresh for a new trainer, the file's after `load`/`restore`.

        Written into every checkpoint (and into the names of automatic ones); set it, or pass
        ``CheckpointPolicy(run_id=...)``, to give a run a name a new process can resume by.
        """
        return self._run_id

    @run_id.setter
    def run_id(self, value: str) -> None:
        if (problem := run_id_problem(value)) is not None:
            raise ConfigError(problem)
        self._run_id = value

    @property
    def idle(self) -> bool:
        """Whether the next step runs idle (loss only; see `HybridConfig.idle_after`)."""
        return self.cadence.idle(self.steps_done)

    def parts(self) -> dict[str, Part]:
        """The parts whose states make up a checkpoint, in the order they are restored."""
        return {"optimizer": self.optimizer, "dynamics": self.dynamics, "model": ModelState(self.model),
                "state": self.state, "phase": self.phases, "cycle": self.cycle, "cadence": self.cadence,
                "recorder": self.recorder, "real_steps": self.real_steps, "bandit": self.bandit,
                "residuals": self.residuals, "corrector": self.corrector, "directions": self.directions,
                "metrics": self.metrics, "ledger": self.ledger, "readout": self.readout, "lr": self.lr_tuner,
                "freeze": self.freeze, "rng": self.rng, "data": self.data_position, "callbacks": self.callback_states}

    def summary(self) -> dict[str, Any]:
        """The metrics summary plus what the read-out chose, the learning-rate recommendation and layer freezing;
        ``"optimizer"`` holds the optimizer's own ``summary()`` when it has one (`TorchOptimizer`: the steps its
        GradScaler skipped)."""
        own = {"optimizer": self.optimizer.summary()} if has_method(self.optimizer, "summary") else {}
        return {**self.metrics.summary(), "readout": self.readout.summary(), "lr": self.lr_tuner.summary(),
                "freeze": self.freeze.summary(), **own}

    # -- the read-out --------------------------------------------------------------------------

    def evaluation_parameters(self, kind: str | None = None) -> AbstractContextManager[str]:
        """Swap a read-out of averaged weights into the model for the ``with`` body; yields its name.

        ``kind`` is ``"lawa"``, ``"ema"``, ``"raw"`` or None: the one that did best in the trainer's
        paired comparisons (``raw`` until a read-out has done better). On exit, also when the body
        raises, the raw weights are put back bit for bit; training always continues from them.
        Needs `Model.set_parameters`.
        """
        return readout_swapped_in(self.readout, self.model, kind)

    def export_parameters(self, kind: str | None = None) -> list[Array]:
        """Fresh copies of the parameters to deploy: the read-out ``kind`` (see `evaluation_parameters`)."""
        return export_parameters(self.readout, self.model, kind)

    # -- stepping ------------------------------------------------------------------------------

    def step(self, batch: Any) -> StepResult:
        """Run one step in the current phase and advance the phase machine.

        A real step's ``loss`` is ``None`` until it is read (see `flush`). A step that raises leaves the
        trainer where its message says (docs/architecture.md, "When a step fails"); a batch with zero
        samples raises `BatchError` before anything runs, and so does a step with no room left in the
        optimizer's learning-rate schedule, with `ConfigError` (`hybrid_core._schedule`).
        """
        start = time.perf_counter()
        current = self.phases.state
        index = self.steps_done
        require_room(self.optimizer, index)
        self.batch_check.before_step(batch, index, current.phase.value)
        if current.phase is Phase.PREDICT:
            result, signals = self.predictor.step(batch, current, index)
            advance_schedule(self.optimizer)  # a schedule counts every step (see _schedule.py)
        else:
            result, signals = self._real_step(batch, current, index)
        self._advance(current, signals)
        seconds = time.perf_counter() - start
        if current.phase is Phase.PREDICT:
            self.metrics.record(StepRecord(index, Phase.PREDICT.value, result.loss, result.predicted_loss,
                                           False, seconds, result.confidence))
        elif self.ledger.pending and self.ledger.pending[-1].step == index:
            self.ledger.pending[-1] = self.ledger.pending[-1]._replace(seconds=seconds)
        else:
            self.metrics.add_seconds(index, seconds)
        return result

    def flush(self) -> None:
        """Read and record every pending real step now (one host read); `fit` and `save` call it."""
        self.real_steps.flush()

    def _real_step(self, batch: Any, current: PhaseState, index: int) -> tuple[StepResult, Signals]:
        measure = self.real_steps.eager or self.cadence.measured(current, index)
        if self.readout.compare_due(index) and has_method(self.model, "set_parameters"):
            # The read-outs' losses on this batch are read with the next read, paired with this step's loss.
            probe = self.readout.probe(self.model, batch, self._forward,
                                       with_raw=getattr(self.model, "loss_in_eval_mode", False) is True)
            self.metrics.count("readout_forwards", len(probe))
            self._probe = (index, list(probe))
            self.real_steps.extra = [self._xp.reshape(v, (1,)) for v in probe.values()]
        if current.phase is Phase.CORRECT and current.steps_in_phase == 0 and self.cycle.search_due:
            search = self.cycle.line_search(self.model, batch, self._forward, self.ledger.read_arrays)
            if search is not None:
                self.metrics.count("line_searches")
                self.metrics.count("line_search_forwards", search.forwards)
                self.metrics.count("line_search_rollback_pct", round(100 * search.best_fraction))
                if not search.finite:
                    self.metrics.count("nonfinite_in_predict")
            # Predicted steps and the search moved the weights outside a step: a rollback must not
            # replay across them, so the point reached becomes the verified one.
            self.ledger.verify(self.model, self.optimizer)
        settled = self.real_steps.run(index, current, batch, measure, measure and not self.cadence.idle(index))
        self.batch_check.accepted(batch)
        if settled is None:
            return (StepResult(index, current.phase, None, None, True, self.recorder.confidence),
                    Signals(self.recorder.confidence, 0, False, False))
        last = settled[-1] if settled and settled[-1][0] == index else None
        if self._probe is not None and self.real_steps.extra_values:
            at, kinds = self._probe
            losses = dict(zip(kinds, self.real_steps.extra_values))
            raw = losses.pop("raw", None)  # the raw weights' `loss`, when the training loss is not comparable
            if raw is None:
                raw = next((loss for step, loss, _ in self.real_steps.extra_records if step == at), math.nan)
            self.readout.record(raw, losses)
            self.metrics.count("readout_comparisons")
            self._probe, self.real_steps.extra_values, self.real_steps.extra_records = None, [], []
        diverging = self.recorder.take_diverging()
        if diverging and self.lr_tuner.back_off(index, "the divergence monitor asked for real steps"):
            self.metrics.count("lr_backoffs_monitor")
        horizon = 0
        if last is not None and current.phase is Phase.FULL and not diverging:
            horizon = self.predictor.decide(current, index)
        loss_f = None if last is None else last[1]
        predicted = None if last is None else last[2]
        skipped = last is None
        rec = self.metrics.last if last is not None else None  # the step's record: its lr and gradient norm
        lr, grad_norm = (rec.lr, rec.grad_norm) if rec is not None and rec.step == index else (None, None)
        result = StepResult(index, current.phase, loss_f, predicted, True, self.recorder.confidence, skipped=skipped,
                            lr=lr, grad_norm=grad_norm)
        return result, Signals(self.recorder.confidence, horizon, False, diverging or skipped)

    # -- decisions and phase changes ------------------------------------------------------------

    def _advance(self, current: PhaseState, signals: Signals) -> None:
        nxt = self.phases.advance(signals)
        if nxt.phase is Phase.PREDICT and current.phase is not Phase.PREDICT:
            self.predictor.start(current, nxt)
        elif nxt.phase is Phase.CORRECT and current.phase is not Phase.CORRECT and self.cycle.active:
            self.predictor.enter_correct(nxt)
        elif current.phase is Phase.CORRECT and nxt.phase is not Phase.CORRECT:
            self.predictor.finish(self.steps_done)

    def _forward(self, batch: Any) -> Array:
        loss = call_model(self.model.loss, batch, "loss")
        check_loss_and_grads(self._xp, self.model, loss, None)
        return self._xp.reshape(loss, (1,))

    # -- the loop and checkpoints ---------------------------------------------------------------

    def fit(self, batches: Iterable[Any] | Callable[[int], Any], steps: int | None = None, *,
            max_steps: int | None = None, epochs: int | None = None, progress: bool | None = None,
            callbacks: Sequence[Callback] = (), checkpoint: CheckpointPolicy | None = None) -> dict[str, Any]:
        """Train on ``batches`` up to the run's total and return the metrics summary (everything read at the end).

        ``batches``: a function of the global step index (a resumed run gets the batches it would have
        seen), a re-iterable (a list, a ``DataLoader``: passes over it are counted, and a resume continues
        the pass where the run was; see `hybrid_core._position`), or a one-shot iterator (one pass).

        The run's length is a total, as Lightning's: ``max_steps`` steps in all (a trainer at step *s*
        runs ``max_steps - s`` more, none if it is there already, so a resumed run ends where the
        uninterrupted one does) and/or ``epochs`` passes in all over a re-iterable; whichever comes first.
        With ``max_steps`` alone a re-iterable is passed over again and again; with neither (nor ``steps``)
        training goes to the end of the current pass. ``steps`` counts from this call (kept for
        compatibility; giving it with ``max_steps`` is a `ConfigError`). A one-shot iterator that ends
        before the total is said on stderr. A callback returning True also stops it.

        A learning-rate schedule counts every training step (see `hybrid_core._schedule`): a run longer
        than what the schedule was built for (``OneCycleLR.total_steps``) is a `ConfigError` before any step.

        ``progress`` (default on; False: off) shows the rate, ETA, epoch, phase, loss, learning rate and
        backward passes skipped on stderr: a tqdm bar on a terminal or in a notebook, a plain line per
        tenth of the run in a log (`hybrid_core._progress.Progress`). Every callback is called after each
        step (also after an earlier one asked to stop), before the step's checkpoint; ``on_fit_start(trainer)``
        / ``on_fit_end(trainer)`` methods, if a callback has them, before the first step (before a resume)
        and once the loop ends (after the last read).
        Callbacks with state (``state_dict``/``load_state_dict``) are attached to the trainer
        (`callback_states`): their states are saved with its checkpoints and restored on resume.
        ``checkpoint`` saves the whole trainer every ``checkpoint.every`` steps, keeps the run's newest
        ``checkpoint.keep`` files, and first resumes the run from its newest good one, saying "resumed from
        step N (file …)" on stderr (see `CheckpointPolicy`); a failed save ends `fit` with
        `CheckpointError`, the trainer at the step it reached. The summary also holds ``epochs`` (passes
        completed) and ``epoch_batches`` (steps taken in the current pass).
        """
        return run_fit(self, batches, steps, progress, callbacks, checkpoint, max_steps, epochs)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the whole trainer (every part's state) to ``path`` atomically; pending steps are read first.

        In a run of several processes every rank calls it: rank 0 writes the file (with every rank's random
        generators), and all ranks return once it is written, or raise `CheckpointError` if it was not.

        The file records the run: its `run_id` and the learning rate it started with. Any
        `OSError` while writing raises `CheckpointError` naming ``path``; a file already there is
        left intact and so is the trainer (it can keep training or save elsewhere).
        """
        save_trainer(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], model: Model, optimizer: Optimizer,
             dynamics: DynamicsModel | None = None, max_bytes: int = DEFAULT_MAX_BYTES, *,
             config: HybridConfig | None = None, collective: Collective | None = None) -> HybridTrainer:
        """A trainer restored from ``path`` around ``model`` and ``optimizer`` (their states are overwritten).

        The run then continues exactly as if it had never stopped (bit for bit on deterministic
        CPU backends), under the file's `run_id`. ``config`` (keyword) None takes the saved config; a
        given ``config`` must equal it, and ``optimizer``'s learning rate must equal the one the run
        started with: any difference raises `ConfigError` listing the fields, before anything is
        changed (set ``optimizer.lr`` after loading to change the rate). A truncated, corrupted,
        foreign, older-format or newer file, or a part whose state does not check out, raises
        `CheckpointError` and leaves ``model`` and ``optimizer`` bit for bit as they were (every part's
        state is checked before any is applied). Without ``dynamics``, a file saved with one of the
        library's dynamics models (`TrendDynamics`, or `RSSMDynamics`, the default of earlier
        versions) gets a fresh one of that kind to load into. Every rank of a distributed run loads the
        same file (docs/distributed.md); ``collective`` as for the constructor.
        """
        return load_trainer(cls, path, model, optimizer, config, dynamics, max_bytes, collective)

    def restore(self, path: str | os.PathLike[str], max_bytes: int = DEFAULT_MAX_BYTES,
                run_id: str | None = None) -> None:
        """Load the checkpoint at ``path`` into this trainer, which then continues that file's run.

        The file's config must equal this trainer's and its starting learning rate this run's,
        else `ConfigError` lists the differences. With ``run_id``, a file of another run (or one
        without a run id) is refused with `CheckpointError`. On any refusal nothing changes.
        """
        restore_trainer(self, path, max_bytes, run_id)

    def __repr__(self) -> str:
        return (f"HybridTrainer(step={self.steps_done}, phase={self.phase.value}, "
                f"backend={library_name(self._xp)})")
