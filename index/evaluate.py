"""Retrieval quality of a teacher/student pair on labelled images, leave-one-out (Recall@K, mAP, precision@1,
MAP@R); of any (query model, database model) pair (`evaluate_pair`); and the revisited Oxford/Paris protocol
(`evaluate_revisited`).

Every image queries all the others. Three settings: the teacher alone (the ceiling), the student alone
(symmetric), and student queries against the teacher-embedded database (the asymmetric setting the server
runs). With an index folder the asymmetric setting queries the built index itself, so the figure also covers
the faiss factory's approximation.

`multiscale=True` embeds every image, query and database alike, at scales 1, 1/√2 and 1/2 and uses the
re-normalised mean (`asymsearch.core.multiscale`), the usual multi-scale retrieval protocol. With an index folder
the database side is what the index holds, embedded at the scales its manifest records. `flip=True` adds each
image's left-right mirror to its descriptor's mean (queries and database alike).
"""
from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from asymsearch.core.data import ImageItem, list_image_folder, select_classes
from asymsearch.core.errors import UserError
from asymsearch.core.manifest import check_pairing, require_teacher
from asymsearch.core.metrics import DEFAULT_KS, ranking_metrics, retrieval_metrics
from asymsearch.core.multiscale import MULTISCALE_SCALES, SINGLE_SCALE, index_flip, index_scales, with_scales
from asymsearch.core.ort import OnnxEmbedder
from asymsearch.index.build import embed_items, report_skipped
from asymsearch.index.backend import open_index
from asymsearch.index.store import SearchIndex

SETTINGS = ("teacher_teacher", "student_student", "student_teacher")
QUERY_CHUNK = 1024  # queries searched at once against the index: bounds the (chunk, count) ranking in memory


def evaluate(data: str | os.PathLike, teacher: str | os.PathLike, student: str | os.PathLike, *,
             index: str | os.PathLike | None = None, classes: str = "all", batch_size: int = 64,
             ks: Sequence[int] = DEFAULT_KS, progress: bool = True,
             multiscale: bool = False, flip: bool = False) -> dict[str, dict[str, float]]:
    """{setting: {"recall@K": ..., "map": ...}} for the settings in `SETTINGS`, on the images of `data`
    (ROOT/<class>/<image>, class folders chosen by `classes`); `multiscale`: every image at `MULTISCALE_SCALES`."""
    ks = tuple(int(k) for k in ks)
    data = Path(data).resolve()
    teacher_model, student_model = OnnxEmbedder(teacher), OnnxEmbedder(student)
    _check_models(teacher_model, student_model)
    scales = MULTISCALE_SCALES if multiscale else SINGLE_SCALE
    teacher_model, student_model = with_scales(teacher_model, scales, flip), with_scales(student_model, scales, flip)
    store = open_index(index) if index is not None else None  # a folder, or a Milvus location
    try:
        if store is not None:
            check_pairing(student_model.manifest, store.manifest)
            held, held_flip = index_scales(store.manifest), index_flip(store.manifest)
            if held != scales or held_flip != flip:
                print(f"note: the index {index} holds images embedded at scales {_fmt(held, held_flip)}; the "
                      f"queries here are embedded at {_fmt(scales, flip)}", file=sys.stderr)
        items = list_image_folder(data, select_classes(data, classes))
        embedded = embed_items(items, [teacher_model, student_model], batch_size=batch_size, progress=progress,
                               desc="embedding queries")
        report_skipped(embedded.skipped)
        labels = [item.label for item in embedded.items]
        if not any(n > 1 for n in Counter(labels).values()):
            raise UserError(f"{data} needs at least two readable images in some class folder to evaluate retrieval")
        t, s = embedded.vectors
        result = {
            "teacher_teacher": retrieval_metrics(t, labels, t, labels, exclude_self=True, ks=ks),
            "student_student": retrieval_metrics(s, labels, s, labels, exclude_self=True, ks=ks),
        }
        if store is None:
            result["student_teacher"] = retrieval_metrics(s, labels, t, labels, exclude_self=True, ks=ks)
        else:
            result["student_teacher"] = index_metrics(store, s, embedded.items, ks=ks)
        return result
    finally:
        if store is not None:
            store.close()


def evaluate_pair(data: str | os.PathLike, query_model: str | os.PathLike, database_model: str | os.PathLike, *,
                  classes: str = "all", batch_size: int = 64, ks: Sequence[int] = DEFAULT_KS,
                  progress: bool = True, multiscale: bool = False, flip: bool = False) -> dict[str, float]:
    """Leave-one-out metrics (Recall@K, mAP, precision@1, MAP@R) of any (query model, database model) pair on the
    labelled images of `data`: every image embedded by the query model searches every other image embedded by
    the database model. The two must live in one space: the same teacher id and dimension (a teacher with
    itself, a student with its teacher, two students of one teacher). `multiscale`: both at `MULTISCALE_SCALES`;
    `flip`: both flip-averaged."""
    ks = tuple(int(k) for k in ks)
    data = Path(data).resolve()
    query, database = OnnxEmbedder(query_model), OnnxEmbedder(database_model)
    check_pairing(query, database, query_name=str(query_model), database_name=str(database_model))
    same = Path(query_model).resolve() == Path(database_model).resolve()
    scales = MULTISCALE_SCALES if multiscale else SINGLE_SCALE
    query, database = with_scales(query, scales, flip), with_scales(database, scales, flip)
    items = list_image_folder(data, select_classes(data, classes))
    embedded = embed_items(items, [query] if same else [query, database], batch_size=batch_size, progress=progress,
                           desc="embedding images")
    report_skipped(embedded.skipped)
    labels = [item.label for item in embedded.items]
    if not any(n > 1 for n in Counter(labels).values()):
        raise UserError(f"{data} needs at least two readable images in some class folder to evaluate retrieval")
    q = embedded.vectors[0]
    db = q if same else embedded.vectors[1]
    return retrieval_metrics(q, labels, db, labels, exclude_self=True, ks=ks)


def evaluate_revisited(images: str | os.PathLike, ground_truth: str | os.PathLike, query_model: str | os.PathLike,
                       database_model: str | os.PathLike, *, batch_size: int = 32,
                       progress: bool = True, multiscale: bool = False,
                       flip: bool = False) -> dict[str, dict[str, float]]:
    """The revisited Oxford / Paris protocol (`core.roxford`): easy / medium / hard mAP and mP@1,5,10.

    `ground_truth` is the data set's `gnd_<name>.pkl`; `images` the folder of its `<name>.jpg` files. Queries
    are cropped to their bounding box (`bbx`) as the protocol prescribes, embedded by the query model; the
    database is embedded by the database model (a student against its teacher: the asymmetric setting).
    `multiscale`: queries and database at `MULTISCALE_SCALES`; `flip`: both flip-averaged."""
    from asymsearch.core.preprocess import decode_image
    from asymsearch.core.roxford import evaluate_embeddings, load_ground_truth

    images = Path(images)
    cfg = load_ground_truth(ground_truth)
    query, database = OnnxEmbedder(query_model), OnnxEmbedder(database_model)
    check_pairing(query, database, query_name=str(query_model), database_name=str(database_model))
    scales = MULTISCALE_SCALES if multiscale else SINGLE_SCALE
    query, database = with_scales(query, scales, flip), with_scales(database, scales, flip)

    def load(name: str):
        path = images / f"{name}.jpg"
        if not path.is_file():
            raise UserError(f"image {path} listed by {ground_truth} not found")
        return decode_image(path)

    def embed(model: OnnxEmbedder, names: Sequence[str], boxes=None) -> np.ndarray:
        out = []
        for start in range(0, len(names), batch_size):
            batch = [load(n) for n in names[start:start + batch_size]]
            if boxes is not None:
                batch = [img.crop(tuple(int(round(v)) for v in box))
                         for img, box in zip(batch, boxes[start:start + batch_size])]
            out.append(model.embed_images(batch))
        return np.concatenate(out) if out else np.zeros((0, model.dim), np.float32)

    boxes = [g["bbx"] for g in cfg["gnd"]] if all("bbx" in g for g in cfg["gnd"]) else None
    q = embed(query, cfg["qimlist"], boxes)
    db = embed(database, cfg["imlist"])
    return evaluate_embeddings(q, db, cfg["gnd"])


def index_metrics(store: SearchIndex, queries: np.ndarray, items: Sequence[ImageItem], *,
                  ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Score `queries` (labelled by `items`) against the whole ranking `store` returns; a query that is itself in
    the index (same absolute path) is removed from its own ranking. Ids an approximate index leaves out (-1)
    count as misses: the denominator of AP comes from the metadata, not from what the search returned."""
    all_ids = store.ids()  # ascending; gaps once images have been removed
    meta = store.lookup(all_ids)
    row_of = np.zeros(int(all_ids.max()) + 1 if len(all_ids) else 1, dtype=np.int64)
    row_of[all_ids] = np.arange(len(all_ids))
    db_labels = np.asarray([label for _, label in meta])[row_of]  # indexed by id
    position = {path: int(i) for i, (path, _) in zip(all_ids, meta)}
    query_labels = np.asarray([item.label for item in items])
    self_ids = np.asarray([position.get(item.path, -2) for item in items], dtype=np.int64)  # -2: not in the index

    relevant = []
    for start in range(0, len(items), QUERY_CHUNK):
        stop = start + QUERY_CHUNK
        _, ids = store.search(queries[start:stop], store.count)
        keep = (ids >= 0) & (ids != self_ids[start:stop, None])
        order = np.argsort(~keep, axis=1, kind="stable")  # kept entries first, in ranking order
        ids, keep = np.take_along_axis(ids, order, axis=1), np.take_along_axis(keep, order, axis=1)
        relevant.append(keep & (db_labels[np.where(keep, ids, 0)] == query_labels[start:stop, None]))
    relevant = np.concatenate(relevant)
    held_labels = db_labels[all_ids]
    num_relevant = (held_labels[None, :] == query_labels[:, None]).sum(axis=1) - (self_ids >= 0)
    if not num_relevant.any():
        raise UserError(f"no query label appears in index {store.folder}: evaluate on images of the classes it holds")
    return ranking_metrics(relevant, num_relevant, ks)


def format_table(result: dict[str, dict[str, float]]) -> str:
    """An aligned text table: one row per setting, one column per metric (R@K, mAP)."""
    if not result:
        return ""
    columns = list(next(iter(result.values())))
    names = {"map": "mAP", "map@r": "MAP@R", "precision@1": "P@1"}
    headers = [names.get(c, c.replace("recall@", "R@")) for c in columns]
    width = max(len("setting"), *(len(name) for name in result))
    cell = max(6, *(len(h) for h in headers))
    lines = [f"{'setting':<{width}}  " + "  ".join(f"{h:>{cell}}" for h in headers)]
    for name, metrics in result.items():
        lines.append(f"{name:<{width}}  " + "  ".join(f"{metrics[c]:>{cell}.4f}" for c in columns))
    return "\n".join(lines)


def _fmt(scales: Sequence[float], flip: bool = False) -> str:
    return ", ".join(f"{s:.3g}" for s in scales) + (" with flip" if flip else "")


def _check_models(teacher: OnnxEmbedder, student: OnnxEmbedder) -> None:
    require_teacher(teacher)
    check_pairing(student, teacher, query_name=f"student {student.path}")
