"""Embedding shards: what an interrupted build or add leaves behind so that it can resume where it stopped.

A work folder holds `plan.json` (what is being embedded: the teacher's sha256, a digest of the image listing, the
shard and batch sizes) and one pair of files per finished shard: `shard-NNNNNN.npy` (the (n, dim) float32
embeddings of the readable images of that shard, in listing order) and `shard-NNNNNN.json` (their positions in
the listing and the skipped files with reasons). Shard `i` covers listing positions [i*S, (i+1)*S), and its
batches are cut at the same positions whether or not the run was interrupted, so a resumed run computes
bit-identical embeddings. Both files are written to a temporary name and renamed; the .json, renamed last, is
the shard's commit mark.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from asymsearch.core.data import ImageItem
from asymsearch.core.errors import UserError
from asymsearch.core.manifest import read_json, write_json_atomic

PLAN_FILE = "plan.json"
PLAN_FORMAT = 1


def listing_digest(items: Sequence[ImageItem]) -> str:
    h = hashlib.sha256()
    for item in items:
        h.update(f"{item.path}\t{item.label}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


class ShardStore:
    """The work folder of one embedding job; see the module docstring for its layout."""

    def __init__(self, folder: Path, plan: dict[str, Any]) -> None:
        self.folder = folder
        self.plan = plan
        self.count = int(plan["count"])
        self.shard_size = int(plan["shard_size"])
        self.dim = int(plan["dim"])

    @classmethod
    def open(cls, folder: str | os.PathLike, plan: dict[str, Any], *, resume: bool) -> "ShardStore":
        """The work folder for `plan`. With `resume`, a folder left by a run with the same plan is reused (its
        finished shards are kept); a different plan is a `UserError`. Without `resume` any old folder is replaced."""
        folder = Path(folder)
        plan = {"format": PLAN_FORMAT, **plan}
        if folder.exists():
            if resume and (folder / PLAN_FILE).is_file():
                old = read_json(folder / PLAN_FILE, "embedding plan")
                if old != plan:
                    changed = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
                    raise UserError(f"cannot resume from {folder}: the interrupted job differs in {', '.join(changed)}"
                                    f" (the images, the teacher or the sizes changed); run without --resume to "
                                    f"start again")
                return cls(folder, plan)
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        write_json_atomic(folder / PLAN_FILE, plan)
        return cls(folder, plan)

    @property
    def num_shards(self) -> int:
        return (self.count + self.shard_size - 1) // self.shard_size

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.count)

    def _paths(self, shard: int) -> tuple[Path, Path]:
        return self.folder / f"shard-{shard:06d}.npy", self.folder / f"shard-{shard:06d}.json"

    def has(self, shard: int) -> bool:
        vectors, info = self._paths(shard)
        return info.is_file() and vectors.is_file()

    def missing(self) -> list[int]:
        return [s for s in range(self.num_shards) if not self.has(s)]

    def done_items(self) -> int:
        return sum(stop - start for start, stop in map(self.shard_range, range(self.num_shards))
                   if self.has(start // self.shard_size))

    def write(self, shard: int, rows: Sequence[int], vectors: np.ndarray, skipped: Sequence[tuple[str, str]]) -> None:
        """Commit shard `shard`: `rows` are listing positions of the embedded images, `vectors` their embeddings."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(rows), self.dim)
        vec_path, info_path = self._paths(shard)
        tmp = vec_path.with_name(vec_path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.save(f, vectors)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, vec_path)
        write_json_atomic(info_path, {"rows": [int(r) for r in rows], "skipped": [list(s) for s in skipped]})

    def read(self, shard: int, *, mmap: bool = False) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
        """(rows int64, vectors (n, dim) float32, skipped) of a finished shard."""
        vec_path, info_path = self._paths(shard)
        info = read_json(info_path, "embedding shard")
        vectors = np.load(vec_path, mmap_mode="r" if mmap else None)
        rows = np.asarray(info["rows"], dtype=np.int64)
        if vectors.shape != (len(rows), self.dim):
            raise UserError(f"embedding shard {vec_path} is damaged ({vectors.shape} for {len(rows)} rows); "
                            f"run without --resume to start again")
        return rows, vectors, [tuple(s) for s in info["skipped"]]

    def iter_shards(self, *, mmap: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]]:
        for shard in range(self.num_shards):
            yield self.read(shard, mmap=mmap)

    def kept_rows(self) -> tuple[np.ndarray, list[tuple[str, str]]]:
        """Listing positions of every embedded image, in order, and every skipped file."""
        rows, skipped = [], []
        for r, _, s in self.iter_shards():
            rows.append(r)
            skipped.extend(s)
        return (np.concatenate(rows) if rows else np.zeros(0, np.int64)), skipped

    def all_vectors(self) -> np.ndarray:
        blocks = [v for _, v, _ in self.iter_shards(mmap=False)]
        return np.concatenate(blocks) if blocks else np.zeros((0, self.dim), np.float32)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
