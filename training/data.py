"""Training data: a labelled image dataset, the m-per-class batch sampler, and the train/eval transforms.

Evaluation pixels come from `asymsearch.core.preprocess.preprocess`, the function the index builder and the
server call, so validation measures exactly what serving will see.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision import transforms as T

from asymsearch.core.data import ImageItem
from asymsearch.core.errors import UserError
from asymsearch.core.manifest import Preprocessing
from asymsearch.core.preprocess import decode_image, preprocess

_INTERPOLATION = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC,
                  "nearest": T.InterpolationMode.NEAREST}


class ImageDataset(Dataset):
    """`items[i]` -> (transform(RGB image), class_to_idx[label])."""

    def __init__(self, items: Sequence[ImageItem], class_to_idx: dict[str, int],
                 transform: Callable[[Image.Image], torch.Tensor]) -> None:
        unknown = sorted({it.label for it in items} - set(class_to_idx))
        if unknown:
            raise ValueError(f"labels without a class index: {', '.join(unknown)}")
        self.items = list(items)
        self.class_to_idx = dict(class_to_idx)
        self.transform = transform
        self.labels = [class_to_idx[it.label] for it in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(decode_image(self.items[i].path)), self.labels[i]


class MPerClassSampler(Sampler[list[int]]):
    """Batches of `classes_per_batch` distinct classes x `m` images each (a batch sampler for DataLoader).

    Classes are visited in a shuffled order, so every class appears about equally often; a class with fewer
    than m images is sampled with replacement. An epoch has max(1, len(labels) // batch) batches. The batches
    depend only on (seed, epoch): call `set_epoch` before each epoch. When fewer than `classes_per_batch`
    classes exist, every batch holds all of them.
    """

    def __init__(self, labels: Sequence[int], m: int, classes_per_batch: int, seed: int = 0) -> None:
        if m < 1 or classes_per_batch < 1:
            raise UserError(f"per-class count ({m}) and classes per batch ({classes_per_batch}) must be positive")
        self.by_class: dict[int, np.ndarray] = {}
        for i, label in enumerate(labels):
            self.by_class.setdefault(int(label), []).append(i)
        self.by_class = {c: np.asarray(ix) for c, ix in sorted(self.by_class.items())}
        if len(self.by_class) < 2:
            raise UserError(f"metric learning needs at least two classes, found {len(self.by_class)}")
        self.m = m
        self.classes_per_batch = min(classes_per_batch, len(self.by_class))
        self.batch_size = self.m * self.classes_per_batch
        self.num_batches = max(1, len(labels) // self.batch_size)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        classes = np.asarray(list(self.by_class))
        queue: list[int] = []
        for _ in range(self.num_batches):
            chosen: list[int] = []
            while len(chosen) < self.classes_per_batch:
                if not queue:
                    queue = list(rng.permutation(classes))
                c = queue.pop()
                if c not in chosen:
                    chosen.append(c)
            batch: list[int] = []
            for c in chosen:
                pool = self.by_class[c]
                batch += rng.choice(pool, size=self.m, replace=len(pool) < self.m).tolist()
            yield batch


def train_transform(spec: Preprocessing) -> Callable[[Image.Image], torch.Tensor]:
    """Augmentation: random resized crop (scale 0.6-1) to `spec.crop`, horizontal flip, normalise."""
    return T.Compose([
        T.RandomResizedCrop(spec.crop, scale=(0.6, 1.0), interpolation=_INTERPOLATION[spec.interpolation]),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(spec.mean, spec.std),
    ])


def view_seed(view: int, index: int) -> int:
    """The seed of augmented view `view` of image `index`: (view, index) mixed into 32 bits, because torch's CPU
    generator keeps only the low 32 bits of a seed (view << 32 | index would give every view the same crops)."""
    return int(np.random.SeedSequence([view, index]).generate_state(1)[0])


def augmented_view(img: Image.Image, spec: Preprocessing, seed: int) -> np.ndarray:
    """One reproducible training view of `img`: `train_transform`'s random resized crop and flip, drawn from `seed`
    (`view_seed`; so that a cache of views can be rebuilt bit for bit). Float32 (3, crop, crop)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return train_transform(spec)(img).numpy()


class EvalTransform:
    """The serving preprocessing (`core.preprocess.preprocess`, numpy) as a torch tensor. Picklable for workers."""

    def __init__(self, spec: Preprocessing) -> None:
        self.spec = spec

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(preprocess(img, self.spec))


def eval_transform(spec: Preprocessing) -> EvalTransform:
    return EvalTransform(spec)
