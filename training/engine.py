"""The one training loop: teacher, student and the comparison experiments all train through `Engine`.

What a trainer gives the engine, each written once here or in the module that owns it:

- the **objective**: `objective(step) -> loss` over the global batch (`SymmetricObjective`: a pair loss from the
  registry with mined negatives, or Proxy-Anchor, composed with the add-ons; `StudentStepObjective`: the AML
  objective against the teacher's cached embeddings, composed with the add-ons);
- the **add-ons** (`training.addons.TrainingAddOns`): they embed the batch (Metrix's mixed examples) and, like a
  loss with parameters of its own (Proxy-Anchor's proxies), train beside the model (`beside`): broadcast from rank 0
  at the start, gradients averaged over the ranks, kept in the training state, never in the checkpoint;
- **handlers** (`Handler`), which hang off the loop at fixed points instead of `if` branches inside it: the
  cross-batch memory (`training.xbm.MemoryLoss`: a loss term and an enqueue after each step), the weight average
  (`WeightAverage`: an update after each optimiser step), the epoch log (`EpochLog`), a trainer's own per-epoch work
  (a frozen backbone's mode, the state file);
- **AMP**: float16 autocast of the forward pass and gradient scaling, on CUDA only;
- **resume**: `state_dict` / `load_state_dict` hold model, optimiser, schedule, scaler, history, best epoch, RNG and
  every handler's and trained-beside module's state; `save_training_state` / `read_training_state` are the file
  around it (a kind, the config, and the check that the config did not change);
- **best epoch**: after every epoch `BestEpoch` keeps the weights of the best validation Recall@1 (the latest
  without validation) of `kept` (the model, or its weight average), and `restore_best` puts them in the model;
- **DDP** (`training.distributed.DistContext`): the network is wrapped in DistributedDataParallel when the run
  starts, the embeddings, labels and rows are gathered into the global batch before the objective, rank 0 alone
  validates (its result broadcast), reports and writes.

One step: embed (under autocast) -> gather -> objective + handlers' loss terms -> zero_grad -> backward (scaled) ->
sync the beside modules' gradients -> optimiser step -> scheduler step -> handlers' `step_done`. One epoch:
`set_epoch` on the sampler, train mode, `epoch_started`, the steps (at most `max_steps`), validation, a history
entry, the best epoch, the report and the handlers' `epoch_done`.
"""
from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from asymsearch.core.errors import UserError
from asymsearch.training.checkpoint import save_checkpoint
from asymsearch.training.common import BestEpoch, check_history_entry, report_epoch, weight_average
from asymsearch.training.config import flat_config
from asymsearch.training.distributed import DistContext
from asymsearch.training.heads import explicit_head_spec, recorded_head_spec, translate_head_specs


@dataclass
class Step:
    """One step's global batch, as the objective and the handlers see it."""

    emb: torch.Tensor  # (B, d) embeddings of the global batch (this rank's part carries the graph)
    labels: torch.Tensor  # (B,)
    idx: torch.Tensor | None = None  # (B,) the batch's rows in the training set (a student's teacher cache)
    mixed: torch.Tensor | None = None  # Metrix's mixed examples (None without Metrix)
    plan: Any = None  # Metrix's MixPlan


class Handler:
    """A piece that hangs off the loop; each method is called at its point of every run and does nothing by
    default. `name`: the key of `state_dict()` in the training state (None: nothing to keep for resume)."""

    name: str | None = None

    def run_started(self, engine: Engine) -> None:
        """Before the first epoch of `run` (a resumed run included)."""

    def epoch_started(self, engine: Engine, epoch: int) -> None:
        """After the model is put in train mode, before the first step of `epoch`."""

    def loss_term(self, step: Step) -> torch.Tensor | None:
        """A term added to the objective's loss of this step (None: nothing)."""
        return None

    def step_done(self, step: Step) -> None:
        """After the optimiser and scheduler steps."""

    def epoch_done(self, engine: Engine, entry: dict) -> None:
        """After the epoch's history entry is made and the best epoch updated (on every rank)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class WeightAverage(Handler):
    """EMA of the weights, W̄ ← decay·W̄ + (1 − decay)·W after every optimiser step (`common.weight_average`);
    `module` holds the averaged weights: give it to the engine as `kept` to validate and keep those."""

    name = "ema"

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model, self.average = model, weight_average(model, decay)

    @property
    def module(self) -> nn.Module:
        return self.average.module

    def step_done(self, step: Step) -> None:
        self.average.update_parameters(self.model)

    def state_dict(self) -> dict:
        return self.average.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.average.load_state_dict(state)


class EpochLog(Handler):
    """One JSON line per epoch in `path` (rank 0), emptied when a run starts from epoch 1."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def run_started(self, engine: Engine) -> None:
        if engine.start_epoch == 1 and engine.ctx.is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    def epoch_done(self, engine: Engine, entry: dict) -> None:
        if engine.ctx.is_main:
            import json
            with self.path.open("a") as f:
                f.write(json.dumps(entry) + "\n")


class OnEpochStart(Handler):
    """`fn(epoch)` at the start of every epoch, after train mode (e.g. a frozen backbone back to eval mode)."""

    def __init__(self, fn: Callable[[int], None]) -> None:
        self.fn = fn

    def epoch_started(self, engine: Engine, epoch: int) -> None:
        self.fn(epoch)


class OnEpochDone(Handler):
    """`fn(engine, entry)` after every epoch, on rank 0 only (e.g. writing the training state)."""

    def __init__(self, fn: Callable[[Engine, dict], None]) -> None:
        self.fn = fn

    def epoch_done(self, engine: Engine, entry: dict) -> None:
        if engine.ctx.is_main:
            self.fn(engine, entry)


class SymmetricObjective:
    """The teacher's objective (and the heads experiments'): the loss over the batch's own pairs with in-batch hard
    negatives from `miner` (None for a loss that mines nothing, Proxy-Anchor), composed with the add-ons
    (`TrainingAddOns.teacher_loss`)."""

    def __init__(self, criterion: nn.Module, miner, addons) -> None:
        self.criterion, self.miner, self.addons = criterion, miner, addons

    def __call__(self, step: Step) -> torch.Tensor:
        return self.addons.teacher_loss(self.criterion, self.miner, step.emb, step.labels, step.mixed, step.plan)


class StudentStepObjective:
    """A student's objective: `training.student.StudentObjective` against the teacher's embeddings of the whole
    training set (`teacher_pool`, `pool_labels`), composed with the add-ons (`TrainingAddOns.student_loss`)."""

    def __init__(self, objective, addons, teacher_pool: torch.Tensor, pool_labels: torch.Tensor) -> None:
        self.objective, self.addons = objective, addons
        self.teacher_pool, self.pool_labels = teacher_pool, pool_labels

    def __call__(self, step: Step) -> torch.Tensor:
        return self.addons.student_loss(self.objective, step.emb, step.labels, step.idx, self.teacher_pool,
                                        self.pool_labels, step.mixed, step.plan)


def _plain_embed(net: nn.Module, x: torch.Tensor, labels: torch.Tensor):
    return net(x), None, None


class Engine:
    """Train `net` (the model itself, or the part of it that trains: a `TailNet`, a head) with `objective`.

    `model`: what the training state and the best epoch hold (the whole network); `kept`: whose weights are
    validated and kept as the best epoch (default `model`; a `WeightAverage.module`). `loader`: re-iterable batches
    `(inputs, labels)` or `(inputs, labels, idx)`; `sampler`: whose `set_epoch(epoch)` is called before each epoch.
    `addons`: `TrainingAddOns` (embedding and trained beside; None: `net(x)`); `beside`: other modules trained
    beside the model, by state key (a loss's own parameters). `validate()` (rank 0): a Recall@1, a dict with
    "recall@1" (and "map"), or None. `report(entry, epochs)` (rank 0; default `report_epoch(name, ...)`).
    """

    def __init__(self, *, model: nn.Module, objective: Callable[[Step], torch.Tensor],
                 optimizer: torch.optim.Optimizer, loader: Iterable, net: nn.Module | None = None,
                 scheduler=None, sampler=None, addons: nn.Module | None = None,
                 beside: Mapping[str, nn.Module | None] | None = None, handlers: Iterable[Handler] = (),
                 validate: Callable[[], Any] | None = None, kept: nn.Module | None = None,
                 ctx: DistContext | None = None, amp: bool = False, max_steps: int = 0, name: str = "train",
                 report: Callable[[dict, int], None] | None = None, progress: bool = True) -> None:
        self.model, self.net, self.kept = model, net if net is not None else model, kept if kept is not None else model
        self.objective, self.optimizer, self.scheduler = objective, optimizer, scheduler
        self.loader, self.sampler, self.addons = loader, sampler, addons
        self.beside = {k: v for k, v in {"addons": addons, **dict(beside or {})}.items() if v is not None}
        self.handlers = list(handlers)
        self.validate, self.name, self.progress, self.max_steps = validate, name, progress, max_steps
        self.ctx = ctx if ctx is not None else DistContext()
        self.report = report if report is not None else (lambda entry, epochs: report_epoch(name, entry, epochs))
        self.use_amp = amp and self.ctx.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.embed = addons.embed if addons is not None else _plain_embed
        self.history: list[dict] = []
        self.best, self.start_epoch = BestEpoch(), 1
        self.ctx.broadcast_module(*self.beside.values())  # outside DDP: every rank starts from rank 0's

    @property
    def steps_per_epoch(self) -> int | None:
        try:
            n = len(self.loader)
        except TypeError:
            return self.max_steps or None
        return min(n, self.max_steps) if self.max_steps else n

    # ---- the loop ---------------------------------------------------------------------------------------------
    def run(self, epochs: int) -> list[dict]:
        """Epochs `start_epoch` .. `epochs` (none when resumed past them); the history of the whole run."""
        train_net = self.ctx.wrap(self.net)  # DistributedDataParallel under torchrun (net itself otherwise)
        for handler in self.handlers:
            handler.run_started(self)
        for epoch in range(self.start_epoch, epochs + 1):
            self.run_epoch(train_net, epoch, epochs)
        return self.history

    def run_epoch(self, train_net: nn.Module, epoch: int, epochs: int) -> dict:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        self.net.train()
        for module in self.beside.values():
            module.train()
        for handler in self.handlers:
            handler.epoch_started(self, epoch)
        losses, seen, t0 = [], 0, time.perf_counter()
        total = self.steps_per_epoch
        bar = tqdm(self.loader, desc=f"{self.name} {epoch}/{epochs}", leave=False, dynamic_ncols=True, total=total,
                   disable=not (self.progress and self.ctx.is_main))
        for i, batch in enumerate(bar):
            if total is not None and i >= total:
                break
            loss, n = self.step(train_net, batch)
            losses.append(loss)
            seen += n
            bar.set_postfix(loss=f"{loss:.4f}")
        seconds = time.perf_counter() - t0
        val = self.validate() if self.validate is not None and self.ctx.is_main else None
        val = self.ctx.broadcast_object(val)  # rank 0 validates; every rank keeps the same best epoch
        val = val if isinstance(val, dict) else {"recall@1": val}
        entry = check_history_entry(epoch, float(np.mean(losses)), val.get("recall@1"))
        entry.update(val_map=val.get("map"), seconds=seconds, images_per_s=seen / seconds if seconds > 0 else None,
                     lr=[g["lr"] for g in self.optimizer.param_groups])
        self.history.append(entry)
        self.best.offer(self.kept, entry)
        if self.ctx.is_main:
            self.report(entry, epochs)
        for handler in self.handlers:
            handler.epoch_done(self, entry)
        return entry

    def step(self, train_net: nn.Module, batch) -> tuple[float, int]:
        """One optimiser step on `batch`; (its loss, the global batch size)."""
        ctx, device = self.ctx, self.ctx.device
        inputs, labels, *rest = batch
        inputs, labels = inputs.to(device, non_blocking=True), labels.to(device)
        idx = rest[0].to(device) if rest else None
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=self.use_amp):
            emb, mixed, plan = self.embed(train_net, inputs, labels)  # (and Metrix's mixed examples)
        step = Step(ctx.gather(emb.float()), ctx.all_gather(labels), None if idx is None else ctx.all_gather(idx),
                    mixed, plan)  # the global batch (one process: as is)
        loss = self.objective(step)
        for handler in self.handlers:
            term = handler.loss_term(step)
            if term is not None:
                loss = loss + term
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        ctx.sync_gradients(*self.beside.values())  # DDP averages the network's
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()
        for handler in self.handlers:
            handler.step_done(step)
        return loss.item(), len(step.labels)

    def restore_best(self) -> int | None:
        """Load the best epoch's weights into `model` (unchanged when no epoch ran); its number, or None."""
        return self.best.restore(self.model, self.history)

    # ---- resume -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue exactly, after the last epoch run."""
        state = {"epoch": self.history[-1]["epoch"] if self.history else self.start_epoch - 1,
                 "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
                 "scaler": self.scaler.state_dict(), "history": self.history, "best_recall": self.best.score,
                 "best_state": self.best.state, "rng": rng_state()}
        state.update({name: module.state_dict() for name, module in self.beside.items()})
        state.update({h.name: h.state_dict() for h in self.handlers if h.name})
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (`state_dict` of an interrupted run): the next epoch is the one after its last."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        for name, module in self.beside.items():
            module.load_state_dict(state.get(name, {}))
        for handler in self.handlers:
            if handler.name:
                handler.load_state_dict(state[handler.name])
        set_rng_state(state["rng"])
        self.start_epoch, self.history = state["epoch"] + 1, list(state["history"])
        marked = [h for h in state["history"] if h.get("best")]
        self.best = BestEpoch(state["best_recall"], state["best_state"], marked[-1].get("val_map") if marked else None)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


STATE_FORMAT = 1


def save_training_state(path: Path, engine: Engine, *, kind: str, config: Any) -> Path:
    """The engine's state as a file a run of the same `config` (a dataclass) resumes from."""
    # head specs with their form: a plain glam / diablo built an earlier form before the papers' forms became the
    # defaults, and both forms share parameter names (a resumed run must not load one form's weights into the other)
    state = {"format": STATE_FORMAT, "kind": kind,
             "config": translate_head_specs(dataclasses.asdict(config), explicit_head_spec),
             "head_forms": "explicit", **engine.state_dict()}
    return save_checkpoint(state, path)


def read_training_state(path: str | Path, *, kind: str, config: Any, resumable: set[str]) -> dict:
    """The state at `path`, checked: readable, of `kind`, saved by a run whose config equals `config` but for the
    keys in `resumable` (a key that a state saved before it existed lacks had its default). `UserError` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"resume state not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - an unreadable file is the user's to fix
        raise UserError(f"cannot read resume state {path}: {e.__class__.__name__}") from None
    if not isinstance(state, dict) or state.get("kind") != kind:
        raise UserError(f"{path} is not a {kind.removeprefix('asymsearch-').replace('-state', '')} training state "
                        f"(OUT.state.pt)")
    required = {f.name: "" for f in dataclasses.fields(config) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING}
    def flat(d: dict, translate=explicit_head_spec) -> dict:
        return flat_config(translate_head_specs(d, translate))
    absent = flat(dataclasses.asdict(type(config)(**required)))
    # a state saved before it recorded head forms meant the earlier form by a plain glam / diablo
    saved = flat(state["config"], explicit_head_spec if state.get("head_forms") == "explicit" else recorded_head_spec)
    changed = sorted(k for k, v in flat(dataclasses.asdict(config)).items()
                     if k.split(".")[0] not in resumable and saved.get(k, absent.get(k)) != v)
    if changed:
        raise UserError(f"cannot resume {path}: the config differs in {', '.join(changed)}")
    return state


__all__ = ["Engine", "EpochLog", "Handler", "OnEpochDone", "OnEpochStart", "Step", "StudentStepObjective",
           "SymmetricObjective", "WeightAverage", "read_training_state", "save_training_state"]
