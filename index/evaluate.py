"""Retrieval quality of a teacher/student pair on labelled images, leave-one-out.

Every image queries all the others. Three settings: the teacher alone (the ceiling), the student alone
(symmetric), and student queries against the teacher-embedded database (the asymmetric setting the server
runs). With an index folder the asymmetric setting queries the built index itself, so the figure also covers
the faiss factory's approximation.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from asymsearch.core.data import ImageItem, list_image_folder, select_classes
from asymsearch.core.errors import PairingError, UserError
from asymsearch.core.manifest import check_pairing
from asymsearch.core.metrics import DEFAULT_KS, ranking_metrics, retrieval_metrics
from asymsearch.core.ort import OnnxEmbedder
from asymsearch.index.build import embed_items, report_skipped
from asymsearch.index.store import SearchIndex

SETTINGS = ("teacher_teacher", "student_student", "student_teacher")
QUERY_CHUNK = 1024  # queries searched at once against the index: bounds the (chunk, count) ranking in memory


def evaluate(data: str | os.PathLike, teacher: str | os.PathLike, student: str | os.PathLike, *,
             index: str | os.PathLike | None = None, classes: str = "all", batch_size: int = 64,
             ks: Sequence[int] = DEFAULT_KS, progress: bool = True) -> dict[str, dict[str, float]]:
    """{setting: {"recall@K": ..., "map": ...}} for the settings in `SETTINGS`, on the images of `data`
    (ROOT/<class>/<image>, class folders chosen by `classes`)."""
    ks = tuple(int(k) for k in ks)
    data = Path(data).resolve()
    teacher_model, student_model = OnnxEmbedder(teacher), OnnxEmbedder(student)
    _check_models(teacher_model, student_model)
    store = SearchIndex.open(index) if index is not None else None
    try:
        if store is not None:
            check_pairing(student_model.manifest, store.manifest)
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


def index_metrics(store: SearchIndex, queries: np.ndarray, items: Sequence[ImageItem], *,
                  ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Score `queries` (labelled by `items`) against the whole ranking `store` returns; a query that is itself in
    the index (same absolute path) is removed from its own ranking. Ids an approximate index leaves out (-1)
    count as misses: the denominator of AP comes from the metadata, not from what the search returned."""
    meta = store.lookup(range(store.count))
    db_labels = np.asarray([label for _, label in meta])
    position = {path: i for i, (path, _) in enumerate(meta)}
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
    num_relevant = (db_labels[None, :] == query_labels[:, None]).sum(axis=1) - (self_ids >= 0)
    if not num_relevant.any():
        raise UserError(f"no query label appears in index {store.folder}: evaluate on images of the classes it holds")
    return ranking_metrics(relevant, num_relevant, ks)


def format_table(result: dict[str, dict[str, float]]) -> str:
    """An aligned text table: one row per setting, one column per metric (R@K, mAP)."""
    if not result:
        return ""
    columns = list(next(iter(result.values())))
    headers = ["mAP" if c == "map" else c.replace("recall@", "R@") for c in columns]
    width = max(len("setting"), *(len(name) for name in result))
    cell = max(6, *(len(h) for h in headers))
    lines = [f"{'setting':<{width}}  " + "  ".join(f"{h:>{cell}}" for h in headers)]
    for name, metrics in result.items():
        lines.append(f"{name:<{width}}  " + "  ".join(f"{metrics[c]:>{cell}.4f}" for c in columns))
    return "\n".join(lines)


def _check_models(teacher: OnnxEmbedder, student: OnnxEmbedder) -> None:
    if teacher.manifest.role != "teacher":
        raise UserError(f"{teacher.path} is a {teacher.manifest.role}, not a teacher (its manifest role must be "
                        f"'teacher')")
    if student.teacher_id != teacher.teacher_id:
        raise PairingError(f"student {student.path} belongs to teacher {student.teacher_id} but {teacher.path} is "
                           f"teacher {teacher.teacher_id}")
    if student.dim != teacher.dim:
        raise PairingError(f"student embeds into {student.dim} dimensions but the teacher into {teacher.dim}")
