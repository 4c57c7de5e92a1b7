"""`asymsearch demo`: the whole pipeline, end to end, in one folder.

train teacher -> train student -> export both -> index build -> serve -> query through the client -> eval.
Without `--data` it generates a small labelled image set (nothing is downloaded). With `--data` it follows the
project's protocol: class folders sorted by name, the first half trains, the second half is the database and
the queries. Writes every artifact and `summary.json` into the work folder.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from asymsearch.core.errors import UserError


@dataclasses.dataclass
class DemoConfig:
    workdir: str
    data: str | None = None  # None -> generate a synthetic image set in WORKDIR/data
    teacher_backbone: str = "tiny_cnn"
    student_backbone: str = "tiny_cnn_narrow"
    pretrained: str | None = None  # for the teacher
    dim: int = 64
    image_size: int = 64
    teacher_epochs: int = 12
    student_epochs: int = 40
    seed: int = 0
    queries: int = 8  # images sent to the server through the client


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, title: str):
        print(f"\n== {title}", flush=True)
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 2)
        print(f"   ({self.seconds[name]:.1f} s)", flush=True)


def run_demo(cfg: DemoConfig) -> dict:
    """Run every stage into `cfg.workdir`; return (and write as summary.json) the evaluation and timings."""
    from asymsearch.clients.client import OnDeviceEmbedder, SearchClient
    from asymsearch.core.data import list_image_folder, select_classes
    from asymsearch.core.synthetic import make_synthetic_dataset
    from asymsearch.export.onnx_export import export_checkpoint
    from asymsearch.index.build import build_index
    from asymsearch.index.evaluate import evaluate, format_table
    from asymsearch.server.engine import QueryEngine
    from asymsearch.server.service import create_server
    from asymsearch.training.config import StudentConfig, TeacherConfig
    from asymsearch.training.student import train_student
    from asymsearch.training.teacher import train_teacher

    work = Path(cfg.workdir)
    work.mkdir(parents=True, exist_ok=True)
    timer = _Timer()
    started = time.perf_counter()

    with timer.stage("data", "data"):
        if cfg.data is None:
            data = make_synthetic_dataset(work / "data", num_classes=16, per_class=30, size=64, seed=cfg.seed)
            print(f"   generated 16 classes x 30 images in {data}")
        else:
            data = Path(cfg.data)
            if not data.is_dir():
                raise UserError(f"image folder not found: {data}")
        train_classes, eval_classes = select_classes(data, "first-half"), select_classes(data, "second-half")
        print(f"   {len(train_classes)} classes train the models, {len(eval_classes)} other classes are the database")

    with timer.stage("train_teacher", f"train teacher ({cfg.teacher_backbone})"):
        teacher_ckpt = train_teacher(TeacherConfig(
            data=str(data), out=str(work / "teacher.pt"), backbone=cfg.teacher_backbone, dim=cfg.dim,
            pretrained=cfg.pretrained, image_size=cfg.image_size, classes="first-half", epochs=cfg.teacher_epochs,
            lr=1e-3, seed=cfg.seed, workers=0))
    with timer.stage("train_student", f"train student ({cfg.student_backbone}) against the frozen teacher"):
        student_ckpt = train_student(StudentConfig(
            data=str(data), teacher=str(teacher_ckpt), out=str(work / "student.pt"), backbone=cfg.student_backbone,
            classes="first-half", epochs=cfg.student_epochs, lr=1e-3, seed=cfg.seed, workers=0))
    with timer.stage("export", "export both to ONNX (checked against torch)"):
        teacher_onnx, student_onnx = work / "teacher.onnx", work / "student.onnx"
        for ckpt, onnx_path in ((teacher_ckpt, teacher_onnx), (student_ckpt, student_onnx)):
            m = export_checkpoint(ckpt, onnx_path)
            print(f"   {onnx_path.name}: {m.role}, dim {m.dim}, teacher id {m.teacher_id}")
    with timer.stage("index", "index the evaluation classes with the teacher"):
        index_dir = work / "index"
        manifest = build_index(teacher_onnx, data, index_dir, classes="second-half", overwrite=True)
        print(f"   {manifest.count} images in {index_dir}")

    with timer.stage("serve_and_query", "serve with the student and query through the client"):
        queries = _pick_queries(list_image_folder(data, eval_classes), cfg.queries)
        engine = QueryEngine.open(index_dir, student_onnx)
        server, port = create_server(engine, host="127.0.0.1", port=0, expose_paths=True)  # local: self-match by path
        try:
            with SearchClient(f"127.0.0.1:{port}", timeout=30) as client:
                client.wait_ready(10)
                info = client.info()
                print(f"   server on port {port}: {info['count']} items, teacher id {info['teacher_id']}")
                device = OnDeviceEmbedder(student_onnx)
                answered = []
                for item in queries:
                    hits = client.search_image(item.path, k=3)
                    on_device = client.search_on_device(device, item.path, k=3)
                    answered.append({"query": item.path, "label": item.label,
                                     "top": [(h.label, round(h.score, 4)) for h in hits],
                                     "self_first": bool(hits and hits[0].path == item.path),
                                     "same_on_device": [h.id for h in hits] == [h.id for h in on_device]})
                for a in answered[:4]:
                    print(f"   {Path(a['query']).parent.name}/{Path(a['query']).name} -> "
                          + ", ".join(f"{lab} {s:.3f}" for lab, s in a["top"]))
                right = sum(a["top"][0][0] == a["label"] for a in answered)
                print(f"   top-1 label right for {right}/{len(answered)} queries; "
                      f"on-device vectors gave the same ids for {sum(a['same_on_device'] for a in answered)}")
        finally:
            server.stop(grace=1).wait()
            engine.close()

    with timer.stage("eval", "evaluate: each database image queries all others"):
        result = evaluate(data, teacher_onnx, student_onnx, index=index_dir, classes="second-half", progress=False)
        chance = _chance_recall_at_1(list_image_folder(data, eval_classes))
        print(format_table(result))
        print(f"   chance Recall@1 for a random embedding: {chance:.3f}")

    timer.seconds["total"] = round(time.perf_counter() - started, 2)
    summary = {"eval": result, "seconds": timer.seconds, "chance_recall@1": chance, "queries": answered,
               "config": dataclasses.asdict(cfg),
               "artifacts": {"teacher_checkpoint": str(teacher_ckpt), "student_checkpoint": str(student_ckpt),
                             "teacher_onnx": str(teacher_onnx), "student_onnx": str(student_onnx),
                             "index": str(index_dir)}}
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n== seconds per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in timer.seconds.items()))
    print(f"summary written to {work / 'summary.json'}")
    sys.stdout.flush()
    return summary


def _pick_queries(items, n: int):
    """One image per class, round-robin over the classes, so the queries cover the database's labels."""
    by_label: dict[str, list] = {}
    for it in items:
        by_label.setdefault(it.label, []).append(it)
    picked, depth = [], 0
    while len(picked) < n and any(len(v) > depth for v in by_label.values()):
        picked += [v[depth] for v in by_label.values() if len(v) > depth][: n - len(picked)]
        depth += 1
    return picked


def _chance_recall_at_1(items) -> float:
    """Expected Recall@1 of a random ranking: for each query, (same-class others) / (all others)."""
    counts: dict[str, int] = {}
    for it in items:
        counts[it.label] = counts.get(it.label, 0) + 1
    n = len(items)
    return sum(c * (c - 1) / (n - 1) for c in counts.values()) / n
