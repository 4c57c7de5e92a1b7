"""Cross-batch memory (XBM; Wang et al., CVPR 2020): a FIFO queue of the most recent embeddings and labels,
detached, that widens the pool the hard negatives are mined from beyond one batch."""
from __future__ import annotations

import torch

from asymsearch.training.engine import Handler


class CrossBatchMemory:
    """Ring buffer of up to `size` (embedding, label) pairs. `enqueue` after each step; `get()` returns the
    stored (M, d) embeddings and (M,) labels, oldest first (M = 0 until the first enqueue)."""

    def __init__(self, size: int, dim: int, device: torch.device | str = "cpu") -> None:
        if size < 0:
            raise ValueError(f"memory size must be >= 0, not {size}")
        self.size, self.dim = int(size), int(dim)
        self.emb = torch.zeros(self.size, self.dim, device=device)
        self.labels = torch.zeros(self.size, dtype=torch.long, device=device)
        self.ptr, self.full = 0, False

    def __len__(self) -> int:
        return self.size if self.full else self.ptr

    @torch.no_grad()
    def enqueue(self, emb: torch.Tensor, labels: torch.Tensor) -> None:
        if self.size == 0:
            return
        emb, labels = emb.detach()[-self.size:], labels.detach()[-self.size:]
        n = emb.shape[0]
        idx = (self.ptr + torch.arange(n, device=self.emb.device)) % self.size
        self.emb[idx] = emb.to(self.emb)
        self.labels[idx] = labels.to(self.labels)
        self.full = self.full or self.ptr + n >= self.size
        self.ptr = (self.ptr + n) % self.size

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.full:
            return self.emb[:self.ptr], self.labels[:self.ptr]
        order = torch.cat([torch.arange(self.ptr, self.size), torch.arange(0, self.ptr)]).to(self.emb.device)
        return self.emb[order], self.labels[order]

    def state_dict(self) -> dict:
        return {"emb": self.emb.cpu(), "labels": self.labels.cpu(), "ptr": self.ptr, "full": self.full}

    def load_state_dict(self, state: dict) -> None:
        self.emb.copy_(state["emb"]), self.labels.copy_(state["labels"])
        self.ptr, self.full = int(state["ptr"]), bool(state["full"])


def xbm_loss(criterion, miner, emb: torch.Tensor, labels: torch.Tensor, memory: CrossBatchMemory) -> torch.Tensor:
    """The memory term: anchors = the batch, reference = the memory (asymmetric call, no self rows), negatives
    mined from the memory. Zero (with a graph) while the memory is empty."""
    mem_emb, mem_labels = memory.get()
    if mem_emb.shape[0] == 0:
        return emb.sum() * 0.0
    negatives = miner(emb, labels, mem_emb, mem_labels)
    return criterion(emb, labels, negatives, mem_emb, mem_labels)


class MemoryLoss(Handler):
    """The cross-batch memory as a handler of the training loop (`training.engine`): each step adds
    `weight` × `xbm_loss` of the batch against the memory to the loss, then enqueues the (gathered) batch; the
    memory is kept in the training state."""

    name = "memory"

    def __init__(self, memory: CrossBatchMemory, criterion, miner, weight: float = 1.0) -> None:
        self.memory, self.criterion, self.miner, self.weight = memory, criterion, miner, weight

    def loss_term(self, step) -> torch.Tensor:
        return self.weight * xbm_loss(self.criterion, self.miner, step.emb, step.labels, self.memory)

    def step_done(self, step) -> None:
        self.memory.enqueue(step.emb, step.labels)

    def state_dict(self) -> dict:
        return self.memory.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.memory.load_state_dict(state)
