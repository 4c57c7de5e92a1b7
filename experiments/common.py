"""What the experiments share: a head trained on cached feature maps through the product's one training loop
(`asymsearch.training.engine.Engine`), the maps' batches, and the embedding of cached maps."""
from __future__ import annotations

import numpy as np


class MapBatches:
    """The batches of `sampler` (m-per-class index lists) as (maps, labels, rows) tensors, re-iterable; rows are
    read from the (memory-mapped) maps in index order and put back in the sampler's. With `flip_generator`, each
    map is mirrored left-right with probability 1/2, drawn from that generator."""

    def __init__(self, sampler, maps: np.ndarray, labels, flip_generator=None) -> None:
        import torch

        self.sampler, self.maps, self.flip = sampler, maps, flip_generator
        self.labels = torch.as_tensor(labels)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        import torch

        for batch in self.sampler:
            x = torch.from_numpy(np.asarray(self.maps[np.sort(batch)], np.float32))
            x = x[torch.as_tensor(np.argsort(np.argsort(batch)))]  # rows back in the sampler's order
            if self.flip is not None:
                flip = torch.rand(len(x), generator=self.flip) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            idx = torch.as_tensor(batch)
            yield x, self.labels[idx], idx


def embed_maps(head, maps: np.ndarray, batch: int = 128) -> np.ndarray:
    """(N, dim) float32 embeddings of cached maps by `head` in eval mode."""
    import torch

    head.eval()
    out = []
    with torch.no_grad():
        for lo in range(0, len(maps), batch):
            out.append(head(torch.from_numpy(np.asarray(maps[lo:lo + batch], np.float32))).numpy())
    return np.concatenate(out).astype(np.float32)


def train_on_maps(head, objective, maps: np.ndarray, labels: list[int], *, per_class: int, classes_per_batch: int,
                  epochs: int, lr: float, weight_decay: float, warmup_epochs: float, seed: int, validate,
                  addons=None, handlers=(), flip: bool = False, report=None) -> list[dict]:
    """Train `head` on the cached `maps` with `objective` (`Step` -> loss) through the product's training loop:
    m-per-class batches, AdamW (`addons`' parameters in their own group), warm-up + cosine schedule, `validate()`
    after each epoch (a Recall@1 or None), the best epoch's weights restored into `head` at the end. Returns the
    per-epoch history."""
    import torch

    from asymsearch.training.data import MPerClassSampler
    from asymsearch.training.engine import Engine
    from asymsearch.training.schedule import make_scheduler

    sampler = MPerClassSampler(labels, per_class, classes_per_batch, seed=seed)
    groups = [{"params": list(head.parameters())}]
    if addons is not None:
        groups += addons.optimizer_group(lr, weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    scheduler = make_scheduler(optimizer, epochs * len(sampler), int(warmup_epochs * len(sampler)))
    gen = torch.Generator().manual_seed(seed) if flip else None
    engine = Engine(model=head, objective=objective, optimizer=optimizer, scheduler=scheduler,
                    loader=MapBatches(sampler, maps, labels, gen), sampler=sampler, addons=addons,
                    handlers=handlers, validate=validate, progress=False, report=report)
    history = engine.run(epochs)
    engine.restore_best()
    return history
