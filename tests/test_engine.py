"""The one training loop (training.engine) against a plain hand-written loop on a tiny model: the same losses,
cross-batch memory, weight average, schedule, validation and best epoch give the same losses and weights; a run
resumed from the state after an epoch continues exactly as the uninterrupted one."""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from asymsearch.core.errors import UserError
from asymsearch.training.addons import AddOnOptions, TrainingAddOns
from asymsearch.training.data import MPerClassSampler
from asymsearch.training.engine import Engine, OnEpochDone, SymmetricObjective, WeightAverage
from asymsearch.training.losses import ContrastiveLoss, HardNegativeMiner
from asymsearch.training.schedule import make_scheduler
from asymsearch.training.xbm import CrossBatchMemory, MemoryLoss

CLASSES, PER_CLASS, IN_DIM, DIM = 6, 8, 8, 5
MEMORY, XBM_WEIGHT, DECAY, MARGIN, NEGATIVES = 12, 0.5, 0.8, 0.3, 3
EPOCHS = 3
SCORES = [0.5, 0.7, 0.7]  # the validation Recall@1 of each epoch: epoch 2 is the best (the first of the two maxima)


def data():
    g = torch.Generator().manual_seed(5)
    labels = torch.arange(CLASSES).repeat_interleave(PER_CLASS)
    x = torch.randn(len(labels), IN_DIM, generator=g) + torch.randn(CLASSES, IN_DIM, generator=g)[labels]
    return x, labels


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(IN_DIM, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, DIM))

    def forward(self, x):
        return F.normalize(self.body(x), dim=1)


class Batches:
    """(inputs, labels) of each m-per-class batch of the sampler, re-iterable."""

    def __init__(self, sampler, x, labels) -> None:
        self.sampler, self.x, self.labels = sampler, x, labels

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for batch in self.sampler:
            idx = torch.as_tensor(batch)
            yield self.x[idx], self.labels[idx]


def parts(seed: int = 0):
    """A fresh model, sampler, optimiser and schedule, as a run builds them."""
    torch.manual_seed(seed)
    model = Net()
    x, labels = data()
    sampler = MPerClassSampler(labels.tolist(), 2, 3, seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=1e-4)
    scheduler = make_scheduler(optimizer, EPOCHS * len(sampler), len(sampler) // 2)
    return model, x, labels, sampler, optimizer, scheduler


def engine_run(epochs: int = EPOCHS, state: dict | None = None, states: list | None = None):
    model, x, labels, sampler, optimizer, scheduler = parts()
    criterion, miner = ContrastiveLoss(MARGIN), HardNegativeMiner(NEGATIVES)
    addons = TrainingAddOns(AddOnOptions(), dim=DIM, num_classes=CLASSES)  # none switched on
    ema = WeightAverage(model, DECAY)
    handlers = [MemoryLoss(CrossBatchMemory(MEMORY, DIM), criterion, miner, XBM_WEIGHT), ema]
    if states is not None:  # the state file of each epoch, as a trainer writes it
        def keep(engine, entry):
            buffer = io.BytesIO()
            torch.save(engine.state_dict(), buffer)
            states.append(buffer.getvalue())
        handlers.append(OnEpochDone(keep))
    scores = iter(SCORES[len(state["history"]):] if state else SCORES)
    engine = Engine(model=model, objective=SymmetricObjective(criterion, miner, addons), optimizer=optimizer,
                    scheduler=scheduler, loader=Batches(sampler, x, labels), sampler=sampler, addons=addons,
                    handlers=handlers, validate=lambda: next(scores), kept=ema.module, progress=False,
                    report=lambda entry, epochs: None)
    if state is not None:
        engine.load_state_dict(state)
    history = engine.run(epochs)
    return engine, history, model, ema


def reference_run():
    """The same training written out by hand: the losses called on each batch, the memory a list, the weight
    average and the best epoch computed in the loop."""
    model, x, labels, sampler, optimizer, scheduler = parts()
    criterion, miner = ContrastiveLoss(MARGIN), HardNegativeMiner(NEGATIVES)
    mem_emb, mem_labels = [], []
    average, best_score, best, per_epoch, epoch_losses = None, None, None, [], []
    for epoch in range(1, EPOCHS + 1):
        sampler.set_epoch(epoch)
        model.train()
        losses = []
        for batch in sampler:
            idx = torch.as_tensor(batch)
            emb, y = model(x[idx]), labels[idx]
            loss = criterion(emb, y, miner(emb, y))
            if mem_emb:
                ref, ref_labels = torch.cat(mem_emb)[-MEMORY:], torch.cat(mem_labels)[-MEMORY:]
                loss = loss + XBM_WEIGHT * criterion(emb, y, miner(emb, y, ref, ref_labels), ref, ref_labels)
            else:
                loss = loss + XBM_WEIGHT * (emb.sum() * 0.0)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            average = weights if average is None else {k: DECAY * average[k] + (1 - DECAY) * w
                                                       for k, w in weights.items()}
            mem_emb.append(emb.detach())
            mem_labels.append(y)
            losses.append(loss.item())
        epoch_losses.append(sum(losses) / len(losses))
        per_epoch.append(dict(average))
        if best_score is None or SCORES[epoch - 1] > best_score:
            best_score, best = SCORES[epoch - 1], dict(average)
    return epoch_losses, per_epoch, best


def close(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_an_engine_run_is_the_plain_loop():
    engine, history, model, ema = engine_run()
    losses, per_epoch, best = reference_run()
    assert [h["loss"] for h in history] == pytest.approx(losses, rel=1e-6)
    averaged = {k.removeprefix("module."): v for k, v in ema.state_dict().items() if k != "n_averaged"}
    assert close(averaged, per_epoch[-1])  # the weight average after the last step
    assert [h["val_recall@1"] for h in history] == SCORES and [h.get("best", False) for h in history] == \
        [True, True, False]
    assert engine.restore_best() == 2
    assert close(model.state_dict(), best)  # the best epoch's averaged weights, now in the model


def test_a_resumed_run_continues_exactly():
    states = []
    whole, history, model, ema = engine_run(states=states)
    assert len(states) == EPOCHS and [h["epoch"] for h in history] == [1, 2, 3]
    torch.manual_seed(123)  # whatever the random state before: the training state brings its own back
    state = torch.load(io.BytesIO(states[0]), weights_only=False)
    resumed, again, model2, ema2 = engine_run(state=copy.deepcopy(state))
    assert [h["epoch"] for h in again] == [1, 2, 3]
    assert [h["loss"] for h in again] == [h["loss"] for h in history]  # exactly
    assert all(torch.equal(v, model2.state_dict()[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, ema2.state_dict()[k]) for k, v in ema.state_dict().items())
    memories = [next(h for h in e.handlers if h.name == "memory").memory.get() for e in (whole, resumed)]
    assert torch.equal(memories[0][0], memories[1][0]) and torch.equal(memories[0][1], memories[1][1])
    assert resumed.restore_best() == whole.restore_best() == 2
    assert all(torch.equal(v, model2.state_dict()[k]) for k, v in model.state_dict().items())
    done, none_more, _, _ = engine_run(state=torch.load(io.BytesIO(states[-1]), weights_only=False))
    assert none_more == history and done.start_epoch == EPOCHS + 1  # resumed past the last epoch: nothing to run


def test_a_diverged_run_stops_with_one_line():
    model, x, labels, sampler, optimizer, scheduler = parts()
    engine = Engine(model=model, objective=lambda step: step.emb.sum() * float("nan"), optimizer=optimizer,
                    loader=Batches(sampler, x, labels), sampler=sampler, progress=False)
    with pytest.raises(UserError, match="diverged at epoch 1"):
        engine.run(1)
