"""Move a stored index into a new teacher's space without reading one image (`asymsearch index transform`).

Ramanujan, Vasu, Farhadi, Tuzel, Pouransari, "Forward Compatible Training for Representation Learning", CVPR 2022
(FCT): when the model changes, learn a small transformation h with h(φ_old(x)) ≈ φ_new(x) on (old vector, new
vector) pairs of a sample of images, and apply it to every stored vector instead of re-embedding the gallery.

- **The map** (`VectorMap`, numpy only: `index/` never imports torch). `linear`: the ridge regression
  y = x A + b, closed form. `mlp`: FCT's choice of a small network, here y = x A + b + relu(x W1 + b1) W2 — the
  ridge solution plus a one-hidden-layer residual trained with Adam on the squared error (W2 starts at 0, so the
  MLP starts as the linear map). The output is L2-normalised, as every stored vector is.
- **The pairs**: a sample of labelled images (e.g. the training half, never the database) embedded once by both
  teachers (`pairs_from_images`: each image decoded once, both ONNX models run on it), or a map learned before
  (`--map`: the `transform.npz` an earlier transform wrote, when the same upgrade is applied to another index).
- **The transform** (`transform_index`): the stored vectors are read back from the faiss index block by block
  (exact for Flat, HNSW and IVF,Flat; the codes' reconstructions for PQ / SQ), mapped, and added to a new index of
  the same factory in the new dimension, trained on a sample of the mapped vectors. The metadata (ids, paths,
  labels) is copied. The result is a new version of a versioned root (published through CURRENT) or a new plain
  folder, whose manifest names the new teacher (`teacher_id`, `teacher_model`) and records
  `build.provenance = "transformed"` with the map, its fit and the version it came from. Only the sample is
  read; the database images are not.

`engine="ray"` (`--engine ray`): the blocks are mapped by Ray Data actors (`index.ray_engine.map_blocks_with_ray`);
reading the stored vectors back, training an IVF/PQ index on a sample of them and adding them stay on the driver,
as a Ray build's merge does. Its output is the in-process transform's.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import faiss
import numpy as np

from asymsearch.core.data import ImageItem
from asymsearch.core.errors import UserError
from asymsearch.core.manifest import IndexManifest, require_teacher, sha256_file

log = logging.getLogger("asymsearch.index")

MAP_KINDS = ("linear", "mlp")
BLOCK = 65536  # vectors read, mapped and added at a time


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass
class VectorMap:
    """y = normalise(x A + b [+ relu(x W1 + b1) W2]) from the old space (A's rows) to the new one (A's columns)."""

    kind: str
    A: np.ndarray
    b: np.ndarray
    W1: np.ndarray | None = None
    b1: np.ndarray | None = None
    W2: np.ndarray | None = None
    fit: dict = field(default_factory=dict)  # how it was learned: pairs, teachers, options, error on the pairs

    @property
    def dims(self) -> tuple[int, int]:
        return int(self.A.shape[0]), int(self.A.shape[1])

    def raw(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        if x.ndim != 2 or x.shape[1] != self.A.shape[0]:
            raise UserError(f"the map takes {self.A.shape[0]}-dimensional vectors, not {x.shape[1:]}")
        y = x @ self.A + self.b
        if self.kind == "mlp":
            y = y + np.maximum(x @ self.W1 + self.b1, 0) @ self.W2
        return y

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return _normalise(self.raw(x)).astype(np.float32)

    def save(self, path: str | os.PathLike) -> None:
        import json
        arrays = {k: v for k, v in (("A", self.A), ("b", self.b), ("W1", self.W1), ("b1", self.b1),
                                     ("W2", self.W2)) if v is not None}
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, kind=np.asarray(self.kind), fit=np.asarray(json.dumps(self.fit)), **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> VectorMap:
        import json
        try:
            with np.load(path, allow_pickle=False) as f:
                kind = str(f["kind"])
                get = {k: (np.asarray(f[k], np.float32) if k in f.files else None) for k in ("W1", "b1", "W2")}
                m = cls(kind, np.asarray(f["A"], np.float32), np.asarray(f["b"], np.float32), **get,
                        fit=json.loads(str(f["fit"])))
        except (OSError, KeyError, ValueError) as e:
            raise UserError(f"cannot read the vector map {path}: {e.__class__.__name__}") from None
        if m.kind not in MAP_KINDS or (m.kind == "mlp" and m.W1 is None):
            raise UserError(f"{path} is not a vector map of kind {' or '.join(MAP_KINDS)}")
        return m


def fit_linear(old: np.ndarray, new: np.ndarray, ridge: float = 1e-2) -> tuple[np.ndarray, np.ndarray]:
    """(A, b) minimising Σ‖x A + b − y‖² + ridge·‖A‖² over the pairs (closed form, b unpenalised)."""
    x, y = np.asarray(old, np.float64), np.asarray(new, np.float64)
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    A = np.linalg.solve(xc.T @ xc + ridge * np.eye(x.shape[1]), xc.T @ yc)
    return A.astype(np.float32), (my - mx @ A).astype(np.float32)


def fit_map(old: np.ndarray, new: np.ndarray, kind: str = "linear", *, ridge: float = 1e-2, hidden: int = 1024,
            epochs: int = 100, lr: float = 1e-3, batch: int = 256, seed: int = 0,
            fit_info: dict | None = None) -> VectorMap:
    """Learn the map from pairs (old (N, d_old), new (N, d_new)), row i of both the same image."""
    old, new = np.asarray(old, np.float32), np.asarray(new, np.float32)
    if kind not in MAP_KINDS:
        raise UserError(f"the map is one of {', '.join(MAP_KINDS)}, not {kind!r}")
    if old.ndim != 2 or new.ndim != 2 or len(old) != len(new):
        raise UserError(f"pairs must be two (N, d) arrays of the same N, not {old.shape} and {new.shape}")
    if len(old) < 2:
        raise UserError(f"a map needs at least 2 pairs, not {len(old)}")
    A, b = fit_linear(old, new, ridge)
    info = {"kind": kind, "pairs": int(len(old)), "ridge": ridge, **(fit_info or {})}
    if kind == "linear":
        m = VectorMap(kind, A, b, fit=info)
    else:
        m = _fit_mlp(old, new, A, b, hidden, epochs, lr, batch, seed)
        info.update(hidden=hidden, epochs=epochs, lr=lr, batch=batch, seed=seed)
        m.fit = info
    m.fit["mean_cosine_on_pairs"] = float(np.mean(np.sum(m(old) * _normalise(new), axis=1)))
    return m


def _fit_mlp(old, new, A, b, hidden, epochs, lr, batch, seed) -> VectorMap:
    """The residual MLP by minibatch Adam on the mean squared error; all of A, b, W1, b1, W2 train."""
    rng = np.random.default_rng(seed)
    d_in, d_out = A.shape
    params = {"A": A.copy(), "b": b.copy(), "W1": (rng.standard_normal((d_in, hidden)) * np.sqrt(2 / d_in)).astype(
        np.float32), "b1": np.zeros(hidden, np.float32), "W2": np.zeros((hidden, d_out), np.float32)}
    m1 = {k: np.zeros_like(v) for k, v in params.items()}
    m2 = {k: np.zeros_like(v) for k, v in params.items()}
    t = 0
    for _ in range(epochs):
        order = rng.permutation(len(old))
        for lo in range(0, len(old), batch):
            rows = order[lo:lo + batch]
            x, y = old[rows], new[rows]
            pre = x @ params["W1"] + params["b1"]
            h = np.maximum(pre, 0)
            err = x @ params["A"] + params["b"] + h @ params["W2"] - y  # d(0.5·mean‖·‖²)/d out, times n
            g_out = err / len(rows)
            g_h = (g_out @ params["W2"].T) * (pre > 0)
            grads = {"A": x.T @ g_out, "b": g_out.sum(0), "W2": h.T @ g_out, "W1": x.T @ g_h, "b1": g_h.sum(0)}
            t += 1
            for k, g in grads.items():  # Adam (Kingma & Ba 2015), β = (0.9, 0.999)
                m1[k] = 0.9 * m1[k] + 0.1 * g
                m2[k] = 0.999 * m2[k] + 0.001 * g * g
                params[k] -= lr * (m1[k] / (1 - 0.9 ** t)) / (np.sqrt(m2[k] / (1 - 0.999 ** t)) + 1e-8)
    return VectorMap("mlp", **{k: v.astype(np.float32) for k, v in params.items()})


def pairs_from_images(items: list[ImageItem], old_teacher: str | os.PathLike, new_teacher: str | os.PathLike, *,
                      batch_size: int = 64, progress: bool = True) -> tuple[np.ndarray, np.ndarray, dict]:
    """(old (N, d_old), new (N, d_new), info): `items` embedded by both teachers, each image decoded once."""
    from asymsearch.core.ort import OnnxEmbedder
    from asymsearch.index.pipeline import embed_items

    old_e, new_e = OnnxEmbedder(old_teacher), OnnxEmbedder(new_teacher)
    require_teacher(old_e, str(old_teacher))
    require_teacher(new_e, str(new_teacher))
    start = time.perf_counter()
    got = embed_items(items, [old_e, new_e], batch_size=batch_size, progress=progress, desc="transform pairs")
    if len(got.items) < 2:
        raise UserError(f"only {len(got.items)} readable sample image(s) to learn the map from")
    info = {"old_teacher_id": old_e.teacher_id, "new_teacher_id": new_e.teacher_id, "images": len(got.items),
            "skipped": len(got.skipped), "seconds": time.perf_counter() - start}
    return got.vectors[0], got.vectors[1], info


def stored_blocks(index: faiss.Index, block: int = BLOCK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, vectors) of every vector an IDMap2 index stores, `block` at a time, as the index holds them."""
    inner = faiss.downcast_index(index.index)
    ids = faiss.vector_to_array(index.id_map).astype(np.int64)
    try:
        faiss.extract_index_ivf(inner).make_direct_map()
    except RuntimeError:
        pass  # not an IVF index: positions reconstruct directly
    for lo in range(0, len(ids), block):
        n = min(block, len(ids) - lo)
        try:
            vectors = inner.reconstruct_n(lo, n)
        except RuntimeError as e:
            raise UserError(f"this faiss index cannot give its vectors back ({str(e).strip().splitlines()[-1]}); "
                            f"it cannot be transformed, rebuild it with the new teacher") from None
        yield ids[lo:lo + n], vectors


EXACT_CODES = ("Flat", "HNSW")  # factories whose stored vectors are the vectors themselves


@dataclass
class TransformPlan:
    """What `check_transform` found: the index version to read, its manifest, the new teacher and the output."""

    source: Path
    folder: Path
    version: str | None
    manifest: IndexManifest
    teacher: Any  # the new teacher's OnnxEmbedder
    teacher_path: Path
    out: Path | None


def check_transform(source: str | os.PathLike, new_teacher: str | os.PathLike,
                    out: str | os.PathLike | None = None) -> TransformPlan:
    """Everything that can be refused before a map is learned or a vector read (one-line `UserError`s): the index,
    the new teacher (a teacher, not the index's own), the output."""
    from asymsearch.core.ort import OnnxEmbedder
    from asymsearch.index import versions
    from asymsearch.index.store import MANIFEST_FILE

    source = Path(source).resolve()
    if not source.is_dir():
        raise UserError(f"index folder not found: {source}")
    folder, version = versions.resolve_index_folder(source)
    old = IndexManifest.load(folder / MANIFEST_FILE)
    teacher = OnnxEmbedder(new_teacher)
    require_teacher(teacher, str(new_teacher))
    if teacher.teacher_id == old.teacher_id:
        raise UserError(f"{source} is already embedded by teacher {teacher.teacher_id}: nothing to transform")
    if old.build.get("on_disk"):
        raise UserError(f"{source} is an on-disk IVF index; transforming those is not supported yet")
    plain_out = Path(out).resolve() if out is not None else None
    if plain_out is None and not versions.is_versioned_root(source):
        raise UserError(f"{source} is a plain index folder: give --out for the transformed index (or transform a "
                        f"versioned root, which gets a new version)")
    if plain_out is not None and plain_out.exists() and (not plain_out.is_dir() or any(plain_out.iterdir())):
        raise UserError(f"{plain_out} already exists; choose another output folder")
    return TransformPlan(source, folder, version, old, teacher, Path(new_teacher), plain_out)


def transform_index(source: str | os.PathLike, new_teacher: str | os.PathLike, vector_map: VectorMap, *,
                    out: str | os.PathLike | None = None, block: int = BLOCK, keep: int | None = None,
                    engine: str = "local", address: str | None = None) -> tuple[IndexManifest, str]:
    """Write the index `source` mapped by `vector_map` into the space of `new_teacher` (an ONNX teacher): a new
    version of `source` when it is a versioned root and `out` is None, else the new plain folder `out`. Returns
    (the new manifest, where it is). Checked before anything is written: the map's input dimension is the index's,
    its output the new teacher's, the new teacher differs from the index's and, when the map records them, the
    teachers it was learned between are these two. `engine="ray"`: the map is applied on the Ray cluster at
    `address` (a local Ray when None), block by block."""
    from asymsearch.index import versions
    from asymsearch.index.faiss_index import add_blocks, apply_search_params, new_index, sample_rows, train_index
    from asymsearch.index.store import INDEX_FILE, MANIFEST_FILE, META_FILE, SKIPPED_FILE

    start = time.perf_counter()
    if engine not in ("local", "ray"):
        raise UserError(f"unknown engine {engine!r}; use local or ray")
    plan = check_transform(source, new_teacher, out)
    source, folder, version, old, teacher, plain_out = (plan.source, plan.folder, plan.version, plan.manifest,
                                                        plan.teacher, plan.out)
    d_in, d_out = vector_map.dims
    if d_in != old.dim:
        raise UserError(f"the map takes {d_in}-dimensional vectors but {source} holds {old.dim}-dimensional ones "
                        f"(teacher {old.teacher_id}); learn the map from this index's teacher")
    if d_out != teacher.dim:
        raise UserError(f"the map gives {d_out}-dimensional vectors but {new_teacher} embeds into {teacher.dim}")
    learned = (vector_map.fit.get("old_teacher_id"), vector_map.fit.get("new_teacher_id"))
    if (learned[0] and learned[0] != old.teacher_id) or (learned[1] and learned[1] != teacher.teacher_id):
        raise UserError(f"the map was learned from teacher {learned[0]} to {learned[1]}, not from {old.teacher_id} "
                        f"(the index's) to {teacher.teacher_id} ({new_teacher})")

    index = faiss.read_index(str(folder / INDEX_FILE))
    if index.ntotal != old.count:
        raise UserError(f"{source}: the faiss index holds {index.ntotal} vectors but the manifest {old.count}")
    fresh = new_index(d_out, old.factory)
    if not faiss.downcast_index(fresh.index).is_trained:  # trained on the mapped vectors at fixed positions
        positions, parts, lo = sample_rows(index.ntotal), [], 0
        for ids, v in stored_blocks(index, block):
            chosen = positions[(positions >= lo) & (positions < lo + len(ids))] - lo
            if len(chosen):
                parts.append(vector_map(v[chosen]))
            lo += len(ids)
        fresh = train_index(fresh, np.concatenate(parts), old.factory)
        del parts
    if engine == "ray":
        from asymsearch.index.ray_engine import map_blocks_with_ray  # the `distributed` extra; only imported here
        mapped = map_blocks_with_ray(stored_blocks(index, block), vector_map, address=address)
    else:
        mapped = ((ids, vector_map(v)) for ids, v in stored_blocks(index, block))
    add_blocks(fresh, mapped, old.factory)
    apply_search_params(fresh, old.search_params)
    seconds = time.perf_counter() - start
    exact = any(old.factory.split(",")[-1].startswith(c) or old.factory.startswith(c) for c in EXACT_CODES)
    change = {"op": "transform", "provenance": "transformed", "from_teacher": old.teacher_id,
              "from_version": version, "from_index": str(source), "to_teacher": teacher.teacher_id,
              "map": vector_map.fit, "source_vectors": "exact" if exact else "reconstructed from the codes",
              "images_read": 0, "seconds": seconds, "engine": engine,
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    history = list(old.build.get("history", []))[-49:]
    build = {**old.build, "provenance": "transformed", "transform": change, "history": history + [change]}
    manifest = IndexManifest(teacher_id=teacher.teacher_id, dim=d_out, metric=old.metric, factory=old.factory,
                             count=int(fresh.ntotal), build=build, search_params=dict(old.search_params),
                             teacher_model={"path": str(Path(new_teacher).resolve()),
                                            "sha256": sha256_file(new_teacher)})

    def write(staged: Path) -> None:
        faiss.write_index(fresh, str(staged / INDEX_FILE))
        for name in (META_FILE, SKIPPED_FILE, "config.yaml"):
            if (folder / name).is_file():
                shutil.copyfile(folder / name, staged / name)
        vector_map.save(staged / "transform.npz")
        if (staged / META_FILE).is_file():
            _transform_probe(staged / META_FILE, vector_map, teacher.teacher_id)
        manifest.save(staged / MANIFEST_FILE)

    if plain_out is None:
        with versions.writer_lock(source) as lock:
            versions.clean_stale(source, lock)
            staged = versions.staging_dir(source)
            try:
                write(staged)
                name = versions.publish(source, staged, keep=keep)
            except BaseException:
                shutil.rmtree(staged, ignore_errors=True)
                raise
        return manifest, str(source / versions.VERSIONS_DIR / name)
    plain_out.parent.mkdir(parents=True, exist_ok=True)
    tmp = plain_out.with_name(f".{plain_out.name}.transform-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        versions.fsync_tree(tmp)
        if plain_out.exists():
            plain_out.rmdir()  # the empty folder checked above
        os.rename(tmp, plain_out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest, str(plain_out)


def _transform_probe(meta: Path, vector_map: VectorMap, teacher_id: str) -> bool:
    """Map the probe set's vectors (`index.probe`: the index's own vectors of its probe images) in the copied
    metadata `meta`, so the quality gate of the new version scores students against the new space; its teacher
    figures are recomputed on the mapped vectors. False when there is no probe set."""
    import io
    import json
    import sqlite3

    from asymsearch.index.probe import PROBE_NAME, PROBE_TABLE, teacher_figures

    con = sqlite3.connect(meta)
    try:
        if not con.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (PROBE_TABLE,)).fetchone():
            return False
        row = con.execute(f"SELECT data FROM {PROBE_TABLE} WHERE name=?", (PROBE_NAME,)).fetchone()
        if row is None:
            return False
        with np.load(io.BytesIO(row[0]), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        info = json.loads(str(arrays["meta"]))
        mapped = vector_map(arrays["teacher"])
        r1, m_ap = teacher_figures(mapped, [str(x) for x in arrays["labels"]], info["mode"])
        info.update(teacher_id=teacher_id, dim=int(mapped.shape[1]), teacher={"recall_at_1": r1, "map": m_ap},
                    source=f"{info.get('source', '')}; vectors transformed from teacher {info.get('teacher_id')}")
        arrays.update(meta=np.array(json.dumps(info, sort_keys=True)), teacher=mapped)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        with con:
            con.execute(f"UPDATE {PROBE_TABLE} SET data=? WHERE name=?", (buf.getvalue(), PROBE_NAME))
    finally:
        con.close()
    return True


def transform_summary(manifest: IndexManifest, where: str) -> dict[str, Any]:
    t = manifest.build["transform"]
    return {"index": where, "teacher_id": manifest.teacher_id, "from_teacher": t["from_teacher"], "count":
            manifest.count, "dim": manifest.dim, "map": t["map"].get("kind"), "seconds": round(t["seconds"], 3),
            "images_read": 0}


__all__ = ["MAP_KINDS", "VectorMap", "fit_linear", "fit_map", "pairs_from_images", "stored_blocks",
           "transform_index", "transform_summary", "check_transform", "TransformPlan"]
