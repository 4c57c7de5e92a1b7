"""Multi-process (multi-GPU) training with `torchrun` and DistributedDataParallel.

Launch::

    torchrun --standalone --nproc-per-node 2 -m asymsearch.cli.main train teacher --data D --out O ...

Every process runs the same command; `DistContext.from_env` reads torchrun's variables (WORLD_SIZE, RANK,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT), joins the process group (nccl on CUDA, one GPU per process at
cuda:LOCAL_RANK; gloo on the CPU) and says which rank this process is. Without those variables (a plain
`asymsearch train ...`) it is a single-process context whose every method is a no-op, so the training loop has
one code path.

What stays equal to one process training on the same global batch (tests/test_distributed.py checks it to float
tolerance on two gloo processes):

- **Batches.** `DistributedMPerClassSampler` draws the single-process `MPerClassSampler`'s global batch (same seed,
  same epoch) on every rank and gives rank r the r-th contiguous 1/world_size of it: the ranks' shares are
  disjoint and their union, in rank order, is the single-process batch. The world size must divide the batch.
- **Losses over the batch.** Metric-learning losses compare every embedding of the batch with every other (pairs,
  mined negatives, Proxy-Anchor's proxies, the cross-batch memory), so each rank gathers the global batch
  (`DistContext.gather`) and computes the loss over all of it: the same value on every rank. The gathered tensor
  keeps the autograd graph of this rank's own part only, with its gradient multiplied by world_size, so that
  after DistributedDataParallel averages the model's gradients over the ranks they are the single-process ones:
  (1/W) Σ_r W ∂L/∂e_r · ∂e_r/∂θ = ∂L/∂θ. Parameters outside the DDP module (proxies, add-on modules) get their
  gradients averaged by `sync_gradients`.
- **Cross-batch memory.** Enqueue the gathered (detached) batch: every rank then holds the single-process memory.

What differs: batch-norm statistics are computed per rank on its share (DDP broadcasts rank 0's running
statistics); random augmentation is drawn per rank (`data_seed`). Checkpoints, training states and logs are
written by rank 0 only (`is_main`); a resumed run loads the same state on every rank.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from asymsearch.core.errors import UserError
from asymsearch.training.common import resolve_device
from asymsearch.training.data import MPerClassSampler

# torchrun's variables: WORLD_SIZE and RANK say a process was launched as one of several
LAUNCH_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


@dataclass(frozen=True)
class LaunchInfo:
    """Where this process sits among those torchrun started (1 / 0 / 0 without torchrun)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0


def launch_info(env: Mapping[str, str] | None = None) -> LaunchInfo:
    """Read torchrun's WORLD_SIZE / RANK / LOCAL_RANK from `env` (default: os.environ) without starting anything.
    Absent WORLD_SIZE: a single process. Malformed values raise a one-line `UserError`."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env:
        return LaunchInfo()
    values = {}
    for name in LAUNCH_VARIABLES:
        text = env.get(name, "0")
        try:
            values[name] = int(text)
        except ValueError:
            raise UserError(f"torchrun variable {name}={text!r} is not an integer") from None
    world, rank, local = values["WORLD_SIZE"], values["RANK"], values["LOCAL_RANK"]
    if world < 1 or not 0 <= rank < world or local < 0:
        raise UserError(f"torchrun variables out of range: WORLD_SIZE={world}, RANK={rank}, LOCAL_RANK={local}")
    return LaunchInfo(world, rank, local)


def check_batch_divides(batch_size: int, world_size: int, rule: str) -> None:
    """Refuse (one line) a global batch that `world_size` processes cannot share equally. `rule` says how the
    batch is made, e.g. "classes_per_batch 8 x per_class 4"."""
    if world_size > 1 and batch_size % world_size:
        below, above = batch_size // world_size * world_size, (batch_size // world_size + 1) * world_size
        near = f"{below} or {above}" if below else f"{above}"
        raise UserError(f"world size {world_size} does not divide the batch of {batch_size} images ({rule}): "
                        f"every process takes an equal share; use a multiple of {world_size} (e.g. {near}) or "
                        f"another --nproc-per-node")


def global_batch(cfg) -> tuple[int, str]:
    """(images per global batch, how the config makes it) for a teacher config (classes_per_batch x per_class) or
    a student config (batch_size // per_class classes, at least 2, x per_class): the sampler's rule."""
    if hasattr(cfg, "classes_per_batch"):
        return cfg.classes_per_batch * cfg.per_class, \
            f"classes_per_batch {cfg.classes_per_batch} x per_class {cfg.per_class}"
    classes = max(2, cfg.batch_size // max(1, cfg.per_class))
    return classes * cfg.per_class, f"batch_size {cfg.batch_size}: {classes} classes x per_class {cfg.per_class}"


def check_launch(cfg, env: Mapping[str, str] | None = None) -> LaunchInfo:
    """Before a process joins a group or touches data: torchrun's variables are well formed and the world size
    divides the config's global batch (one-line `UserError`s otherwise). Returns where this process sits."""
    info = launch_info(env)
    size, rule = global_batch(cfg)
    check_batch_divides(size, info.world_size, rule)
    return info


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times `scale` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # noqa: D102
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        return grad * ctx.scale, None


@dataclass(frozen=True)
class DistContext:
    """This process's place in a (possibly single-process) training run. Build it with `from_env`."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None  # None: not distributed (no process group)

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, training states and logs."""
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str = "auto", *, env: Mapping[str, str] | None = None,
                 timeout_s: float = 1800.0) -> DistContext:
        """The context of this process. Launched by torchrun with WORLD_SIZE > 1: join the process group (nccl
        with cuda:LOCAL_RANK when `device` resolves to CUDA, gloo on the CPU); otherwise a single process on
        `resolve_device(device)`. `timeout_s` bounds every collective (and the wait for the other ranks)."""
        info = launch_info(env)
        resolved = resolve_device(device)
        if info.world_size == 1:
            return cls(device=resolved)
        env = os.environ if env is None else env
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not env.get(v)]
        if missing:
            raise UserError(f"WORLD_SIZE is {info.world_size} but {' and '.join(missing)} is not set: launch with "
                            f"torchrun --nproc-per-node N")
        if resolved.type == "cuda":
            if resolved.index not in (None, info.local_rank):
                raise UserError(f"under torchrun each process uses cuda:LOCAL_RANK; give --device cuda, not "
                                f"{device}")
            if info.local_rank >= torch.cuda.device_count():
                raise UserError(f"LOCAL_RANK {info.local_rank} has no GPU ({torch.cuda.device_count()} visible): "
                                f"use --nproc-per-node <= the number of GPUs")
            resolved = torch.device("cuda", info.local_rank)
            torch.cuda.set_device(resolved)
            backend = "nccl"
        else:
            backend = "gloo"
        if dist.is_initialized():
            raise RuntimeError("a process group is already initialised in this process")
        store_env = {"MASTER_ADDR": env["MASTER_ADDR"], "MASTER_PORT": env["MASTER_PORT"]}
        os.environ.update(store_env)  # env:// reads them from os.environ
        dist.init_process_group(backend, init_method="env://", rank=info.rank, world_size=info.world_size,
                                timeout=timedelta(seconds=timeout_s))
        return cls(info.rank, info.world_size, info.local_rank, resolved, backend)

    def cleanup(self) -> None:
        """Leave the process group (no-op for a single process)."""
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def data_seed(self, seed: int) -> int:
        """A per-rank seed for what each rank should draw differently (augmentation, loader workers)."""
        return seed + 1_000_003 * self.rank

    def broadcast_object(self, obj):
        """Rank 0's `obj` (picklable) on every rank, e.g. what rank 0 alone measured (validation)."""
        if not self.distributed:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # -- model and gradients ------------------------------------------------------------------------------------
    def wrap(self, module: nn.Module, **ddp_kwargs) -> nn.Module:
        """`module` in DistributedDataParallel (rank 0's weights broadcast to every rank now, gradients averaged
        in backward); the module itself for a single process or one without trainable parameters."""
        if not self.distributed or not any(p.requires_grad for p in module.parameters()):
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids, **ddp_kwargs)

    @staticmethod
    def unwrap(module: nn.Module) -> nn.Module:
        """The module inside DistributedDataParallel (itself otherwise): what checkpoints and states hold."""
        return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module

    def broadcast_module(self, *modules: nn.Module | None) -> None:
        """Copy rank 0's parameters and buffers of modules kept outside DDP (proxies, add-ons) to every rank."""
        if not self.distributed:
            return
        with torch.no_grad():
            for module in modules:
                if module is None:
                    continue
                for t in [*module.parameters(), *module.buffers()]:
                    dist.broadcast(t.data, src=0)

    def sync_gradients(self, *modules: nn.Module | None) -> None:
        """Average over the ranks the gradients of parameters outside the DDP module (after `backward`, before
        the optimiser step). Computed after `gather` they are equal on every rank already (a no-op up to
        rounding); used on a rank's own share, the average is what one process would get (see `gather`)."""
        if not self.distributed:
            return
        grads = [p.grad for m in modules if m is not None for p in m.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    # -- gathering the global batch -----------------------------------------------------------------------------
    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """The ranks' `x` concatenated along dim 0 in rank order, without gradient (labels, indices, memory).
        Every rank must pass the same shape (the sampler's equal shares)."""
        if not self.distributed:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.detach().contiguous())
        return torch.cat(parts)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The global batch of embeddings (ranks' `x` concatenated in rank order) for a loss over all of it.

        Only this rank's part carries a graph, with its gradient scaled by world_size: each rank computes the
        same global loss L, so ∂L/∂(own part) is this rank's whole share of the gradient, and DDP's average over
        world_size ranks then gives ∂L/∂θ exactly as one process would. The other parts are constants here; their
        ranks back-propagate them. Same shape on every rank."""
        if not self.distributed:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.detach().contiguous())
        parts[self.rank] = _ScaleGrad.apply(x, float(self.world_size))
        return torch.cat(parts)

    # -- batches --------------------------------------------------------------------------------------------------
    def batch_sampler(self, labels: Sequence[int], m: int, classes_per_batch: int,
                      seed: int = 0) -> DistributedMPerClassSampler:
        """This rank's share of the m-per-class batches (the whole batch for a single process)."""
        return DistributedMPerClassSampler(labels, m, classes_per_batch, seed=seed, rank=self.rank,
                                           world_size=self.world_size)


class DistributedMPerClassSampler(MPerClassSampler):
    """`MPerClassSampler`'s batches, each cut into `world_size` equal contiguous shares; this rank gets share
    `rank`. Every rank draws the same global batch from (seed, epoch), so the shares are disjoint positions of one
    batch and their union in rank order is the single-process batch. A batch holds its classes' images together,
    so when world_size divides classes_per_batch every share holds whole classes. `batch_size` is the global
    batch, `local_batch_size` this rank's share."""

    def __init__(self, labels: Sequence[int], m: int, classes_per_batch: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        super().__init__(labels, m, classes_per_batch, seed=seed)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} of world size {world_size}")
        check_batch_divides(self.batch_size, world_size,
                            f"{self.classes_per_batch} classes x per_class {self.m}")
        self.rank, self.world_size = rank, world_size
        self.local_batch_size = self.batch_size // world_size

    def __iter__(self) -> Iterator[list[int]]:
        lo = self.rank * self.local_batch_size
        for batch in super().__iter__():
            yield batch[lo:lo + self.local_batch_size]


@contextmanager
def distributed_context(device: str = "auto", timeout_s: float = 1800.0) -> Iterator[DistContext]:
    """`DistContext.from_env(device)`, left (`cleanup`) on the way out, error or not."""
    ctx = DistContext.from_env(device, timeout_s=timeout_s)
    try:
        yield ctx
    finally:
        ctx.cleanup()


__all__ = ["DistContext", "DistributedMPerClassSampler", "LaunchInfo", "check_batch_divides", "check_launch",
           "distributed_context", "global_batch", "launch_info"]
