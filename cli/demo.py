"""`asymsearch demo`: the whole pipeline, end to end, in one folder.

train teacher -> train student -> export both -> index build -> serve -> query through the client -> eval.
Without `--data` it generates a small labelled image set (nothing is downloaded) and trains small CNNs: the
student is the teacher at a smaller input size, regressed onto it. With `--data` it runs the real recipe
(docs/results/recipe.md) within `--budget-min`, after printing its estimate: an ImageNet-pretrained
EfficientNet-Lite teacher at its own resolution whose last units train on cached trunk maps, kept only if it beats
the zero-shot model (the same backbone with average pooling) on validation classes carved from the training half;
a student that starts as that teacher at `--student-size` (about 3x fewer FLOPs, measured on the exported graphs)
and regresses onto it; then the final table of zero-shot vs trained teacher vs served student with the cost ratio.
The protocol: class folders in Python's sorted() order, the first half trains, the second half is the database
and the queries. Writes every artifact and `summary.json` into the work folder.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from asymsearch.core.errors import UserError


def _opt(default, help: str):
    """A field with its command-line help (`asymsearch.cli.options` appends the default)."""
    return dataclasses.field(default=default, metadata={"help": help})


# the real recipe's input sizes, chosen on validation classes (experiments/recipe_sizes.py,
# docs/results/recipe.md): a teacher above Lite0's own 224 px and a student at 160
RECIPE_SIZES = {"teacher": 288, "student": 160}


@dataclasses.dataclass
class DemoConfig:
    workdir: str = dataclasses.field(metadata={"help": "folder for every artifact and summary.json"})
    data: str | None = _opt(None, "a labelled image folder ROOT/<class>/<image>: run the real recipe on it (its "
                                  "first half of class folders trains, the second half is the database and the "
                                  "queries); unset: a generated synthetic set and small CNNs")
    budget_min: float = _opt(30.0, "with --data: the time the whole run may take, in minutes; training epochs are "
                                   "fitted into it after the fixed passes over the images, and a run whose fixed "
                                   "passes alone exceed it is refused before it starts")
    teacher_backbone: str = _opt("efficientnet_lite0", "with --data: the teacher, ImageNet-pretrained "
                                                       "(efficientnet_lite0/1/2)")
    teacher_size: int | None = _opt(RECIPE_SIZES["teacher"], "with --data: the teacher's input size in pixels (it "
                                                             "embeds the database once, offline); unset: the "
                                                             "backbone's own")
    student_size: int = _opt(RECIPE_SIZES["student"], "with --data: the student's input size in pixels; it starts "
                                                      "as the teacher at that size (--from-teacher); Lite0 at 160 "
                                                      "px against 288 is 3.2x fewer FLOPs, counted on the graphs")
    teacher_epochs: int | None = _opt(None, "teacher training epochs (unset: 12 on the synthetic set; with --data "
                                            "fitted into the budget, at most 3)")
    student_epochs: int | None = _opt(None, "student training epochs (unset: 30 on the synthetic set; with --data "
                                            "fitted into the budget, at most 6)")
    image_size: int | None = _opt(None, "the synthetic set only: the teacher's input size (unset: 64); the student "
                                        "runs at 9/16 of it. With --data the teacher runs at its backbone's own "
                                        "resolution and --student-size sets the student's")
    seed: int = _opt(0, "seed of every random draw")
    queries: int = _opt(8, "images sent to the server through the client")
    trunk_cache: str = _opt("~/.cache/asymsearch/trunk", "with --data: where the frozen trunks' feature maps are "
                                                         "cached (a second run reads them instead of recomputing)")


# the synthetic demo (no --data): small CNNs on generated images; the student is the teacher at a smaller size
SYNTHETIC = {"backbone": "tiny_cnn", "dim": 64, "image_size": 64, "student_size": 36, "teacher_epochs": 12,
             "student_epochs": 30}
# the real recipe (--data): a pretrained EfficientNet-Lite teacher whose last units train on cached trunk maps,
# starting as the zero-shot model (average pooling, identity projection) so that the floor can keep a WiSE-FT mix
# of the two (training.floor); the student starts as the teacher at a smaller size and regresses onto it
TEACHER_RECIPE = {"head": "gem:init=zero-shot", "dim": 1280, "pretrained": "imagenet", "tune_units": 6, "loss": "proxy-anchor",
                  "classes_per_batch": 16, "per_class": 4, "lr": 5e-4, "backbone_lr": 5e-5, "warmup_epochs": 0.5,
                  "val_fraction": 0.2}
STUDENT_RECIPE = {"from_teacher": True, "tune_units": 9, "loss": "reg", "lr": 2e-4, "backbone_lr": 1e-4,
                  "batch_size": 64, "val_fraction": 0.2, "keep_start": True}
MAX_EPOCHS = {"teacher": 3, "student": 6}


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
    from asymsearch.index.evaluate import evaluate, evaluate_pair, format_table
    from asymsearch.server.engine import QueryEngine
    from asymsearch.server.service import create_server
    from asymsearch.server.tiers import onnx_gflops

    work = Path(cfg.workdir)
    work.mkdir(parents=True, exist_ok=True)
    timer = _Timer()
    started = time.perf_counter()
    estimate = None

    with timer.stage("data", "data"):
        if cfg.data is None:
            data = make_synthetic_dataset(work / "data", num_classes=16, per_class=30, size=64, seed=cfg.seed)
            print(f"   generated 16 classes x 30 images in {data}")
        else:
            data = Path(cfg.data)
            if not data.is_dir():
                raise UserError(f"image folder not found: {data}")
        train_classes, eval_classes = select_classes(data, "first-half"), select_classes(data, "second-half")
        print(f"   {len(train_classes)} classes train the models, {len(eval_classes)} other classes are the database "
              f"(class folders in sorted() order, the first half trains)")
        if cfg.data is not None:
            if cfg.image_size is not None:
                raise UserError("--image-size is the synthetic demo's; with --data the teacher runs at its own "
                                "resolution and --student-size sets the student's")
            estimate = estimate_recipe(data, cfg)
            print(f"   estimate: about {estimate['minutes']:.0f} min on this machine now ({estimate['detail']}), "
                  f"budget {cfg.budget_min:g} min")

    if cfg.data is None:
        teacher_ckpt, student_ckpt = _train_synthetic(cfg, data, work, timer)
    else:
        teacher_ckpt, student_ckpt = _train_recipe(cfg, data, work, timer, estimate)
    with timer.stage("export", "export both to ONNX (checked against torch)"):
        teacher_onnx, student_onnx = work / "teacher.onnx", work / "student.onnx"
        for ckpt, onnx_path in ((teacher_ckpt, teacher_onnx), (student_ckpt, student_onnx)):
            m = export_checkpoint(ckpt, onnx_path)
            print(f"   {onnx_path.name}: {m.role}, dim {m.dim}, {m.input_size} px, teacher id {m.teacher_id}")
        zero_shot_onnx = zero_shot_own_onnx = zero_shot_small_onnx = None
        if cfg.data is not None:
            zero_shot_onnx = work / "zero_shot.onnx"
            if _arch(teacher_ckpt)["head"] == "gap" and _arch(teacher_ckpt).get("pretrained"):
                zero_shot_onnx = teacher_onnx  # the floor held: the teacher is the zero-shot model
            else:
                export_checkpoint(_zero_shot_checkpoint(teacher_ckpt, work / "zero_shot.pt"), zero_shot_onnx)
            own_size = _own_size(cfg.teacher_backbone)
            if _crop(teacher_ckpt) != own_size:  # also the zero-shot model at the backbone's own resolution
                zero_shot_own_onnx = work / f"zero_shot_{own_size}.onnx"
                export_checkpoint(_zero_shot_checkpoint(teacher_ckpt, work / f"zero_shot_{own_size}.pt",
                                                        size=own_size), zero_shot_own_onnx)
            # what serving at the student's cost gives without any training: the zero-shot model at the student's
            # size, embedding its own database
            small = _crop(student_ckpt)
            zero_shot_small_onnx = work / f"zero_shot_{small}.onnx"
            export_checkpoint(_zero_shot_checkpoint(teacher_ckpt, work / f"zero_shot_{small}.pt", size=small),
                              zero_shot_small_onnx)
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
        shown = cfg.data is not None  # minutes on real data: progress bars with their ETA
        result = evaluate(data, teacher_onnx, student_onnx, index=index_dir, classes="second-half", progress=shown)
        if zero_shot_onnx is not None:
            result = {"zero_shot_teacher": result["teacher_teacher"] if zero_shot_onnx == teacher_onnx else
                      evaluate_pair(data, zero_shot_onnx, zero_shot_onnx, classes="second-half", progress=shown),
                      **result}
        if zero_shot_own_onnx is not None:
            result = {"zero_shot_own_size": evaluate_pair(data, zero_shot_own_onnx, zero_shot_own_onnx,
                                                          classes="second-half", progress=shown), **result}
        if zero_shot_small_onnx is not None:
            result = {**result, "zero_shot_student_size": evaluate_pair(
                data, zero_shot_small_onnx, zero_shot_small_onnx, classes="second-half", progress=shown)}
        chance = _chance_recall_at_1(list_image_folder(data, eval_classes))
        print(format_table(result))
        print(f"   chance Recall@1 for a random embedding: {chance:.3f}")

    t_size, s_size = _crop(teacher_ckpt), _crop(student_ckpt)
    gflops = {"teacher": onnx_gflops(teacher_onnx, t_size), "student": onnx_gflops(student_onnx, s_size)}
    cost_ratio = gflops["teacher"] / gflops["student"] if gflops["student"] else None
    timer.seconds["total"] = round(time.perf_counter() - started, 2)
    if zero_shot_own_onnx is not None:
        gflops["zero_shot_own_size"] = onnx_gflops(zero_shot_own_onnx, _own_size(cfg.teacher_backbone))
    if zero_shot_small_onnx is not None:
        gflops["zero_shot_student_size"] = onnx_gflops(zero_shot_small_onnx, s_size)
    table = _final_table(result, gflops, cost_ratio, t_size, s_size,
                         _own_size(cfg.teacher_backbone) if cfg.data is not None else None)
    print("\n" + table)
    summary = {"eval": result, "seconds": timer.seconds, "chance_recall@1": chance, "queries": answered,
               "gflops": gflops, "cost_ratio": cost_ratio, "estimate": estimate,
               "teacher_floor": _config(teacher_ckpt).get("zero_shot_floor"),
               "student_floors": _config(student_ckpt).get("floors"),
               "config": dataclasses.asdict(cfg),
               "artifacts": {"teacher_checkpoint": str(teacher_ckpt), "student_checkpoint": str(student_ckpt),
                             "teacher_onnx": str(teacher_onnx), "student_onnx": str(student_onnx),
                             "zero_shot_onnx": str(zero_shot_onnx) if zero_shot_onnx else None,
                             "zero_shot_own_size_onnx": str(zero_shot_own_onnx) if zero_shot_own_onnx else None,
                             "zero_shot_student_size_onnx": str(zero_shot_small_onnx) if zero_shot_small_onnx
                             else None,
                             "index": str(index_dir)}}
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n== seconds per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in timer.seconds.items()))
    if estimate is not None:
        print(f"   estimated {estimate['minutes']:.1f} min, took {timer.seconds['total'] / 60:.1f} min")
    print(f"summary written to {work / 'summary.json'}")
    sys.stdout.flush()
    return summary


def _config(ckpt: Path) -> dict:
    from asymsearch.training.checkpoint import load_checkpoint
    return load_checkpoint(ckpt).get("config", {})


def _arch(ckpt: Path) -> dict:
    from asymsearch.training.checkpoint import load_checkpoint
    return load_checkpoint(ckpt)["arch"]


def _crop(ckpt: Path) -> int:
    from asymsearch.training.checkpoint import load_checkpoint
    return int(load_checkpoint(ckpt)["preprocessing"]["crop"])


def _own_size(backbone: str) -> int:
    from asymsearch.training.models import backbone_preprocessing
    return int(backbone_preprocessing(backbone)["image_size"])


def _zero_shot_checkpoint(teacher_ckpt: Path, out: Path, size: int | None = None) -> Path:
    """The zero-shot teacher of `teacher_ckpt`: its backbone with the pretrained weights and average pooling, at
    its preprocessing (`training.floor.zero_shot_model`), or at `size` px with the same normalisation, as a
    checkpoint."""
    from asymsearch.core.manifest import Preprocessing
    from asymsearch.training.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
    from asymsearch.training.floor import zero_shot_model
    ckpt = load_checkpoint(teacher_ckpt)
    model, arch = zero_shot_model(ckpt["arch"]["backbone"], ckpt["arch"]["pretrained"] or "imagenet")
    config = {k: ckpt["config"][k] for k in ("train_classes", "val_classes") if k in ckpt["config"]}
    spec = Preprocessing.from_dict(ckpt["preprocessing"])
    if size is not None:
        spec = dataclasses.replace(spec, crop=size, resize=round(spec.resize * size / spec.crop))
    save_checkpoint(make_checkpoint(model, role="teacher", arch=arch, preprocessing=spec,
                                    config={**config, "zero_shot": True}), out)
    return out


def _final_table(result: dict, gflops: dict, ratio: float | None, t_size: int, s_size: int,
                 own_size: int | None = None) -> str:
    rows = [("zero_shot_own_size", f"zero-shot teacher -> teacher ({own_size} px)", gflops.get("zero_shot_own_size")),
            ("zero_shot_teacher", f"zero-shot teacher -> teacher ({t_size} px)", gflops["teacher"]),
            ("teacher_teacher", f"trained teacher -> teacher ({t_size} px)", gflops["teacher"]),
            ("student_teacher", f"served student ({s_size} px) -> teacher index", gflops["student"]),
            ("zero_shot_student_size", f"zero-shot at {s_size} px -> itself (same cost)",
             gflops.get("zero_shot_student_size"))]
    lines = [f"{'':44}  {'R@1':>6}  {'mAP':>6}  {'GFLOPs/query':>12}"]
    for key, name, flops in rows:
        if key in result:
            lines.append(f"{name:44}  {result[key]['recall@1']:6.3f}  {result[key]['map']:6.3f}  {flops:12.3f}")
    if ratio:
        t, st = result["teacher_teacher"], result["student_teacher"]
        lines.append(f"student/teacher: {1 / ratio:.2f}x the FLOPs ({ratio:.2f}x fewer), "
                     f"{st['recall@1'] / t['recall@1']:.3f}x the Recall@1, {st['map'] / t['map']:.3f}x the mAP")
    return "\n".join(lines)


def _train_synthetic(cfg: DemoConfig, data: Path, work: Path, timer: _Timer) -> tuple[Path, Path]:
    """Small CNNs on the generated set: the teacher from scratch, the student the teacher at a smaller size,
    regressed onto it (so student->teacher search lands close to teacher->teacher)."""
    from asymsearch.training.config import StudentConfig, TeacherConfig
    from asymsearch.training.student import train_student
    from asymsearch.training.teacher import train_teacher
    s = dict(SYNTHETIC)
    if cfg.image_size is not None:
        s.update(image_size=cfg.image_size, student_size=max(16, round(cfg.image_size * 9 / 16)))
    s.update({k: v for k in ("teacher_epochs", "student_epochs") if (v := getattr(cfg, k)) is not None})
    with timer.stage("train_teacher", f"train teacher ({s['backbone']}, {s['image_size']} px)"):
        teacher_ckpt = train_teacher(TeacherConfig(
            data=str(data), out=str(work / "teacher.pt"), backbone=s["backbone"], dim=s["dim"],
            image_size=s["image_size"], classes="first-half", epochs=s["teacher_epochs"], lr=1e-3, seed=cfg.seed,
            workers=0))
    with timer.stage("train_student", f"train student (the teacher at {s['student_size']} px) against the frozen "
                                      f"teacher"):
        student_ckpt = train_student(StudentConfig(
            data=str(data), teacher=str(teacher_ckpt), out=str(work / "student.pt"), backbone=s["backbone"],
            from_teacher=True, image_size=s["student_size"], classes="first-half", epochs=s["student_epochs"],
            lr=1e-3, seed=cfg.seed, workers=0))
    return teacher_ckpt, student_ckpt


def _train_recipe(cfg: DemoConfig, data: Path, work: Path, timer: _Timer, estimate: dict) -> tuple[Path, Path]:
    """The real recipe (TEACHER_RECIPE, STUDENT_RECIPE) with the epochs `estimate` fitted into the budget."""
    from asymsearch.training.config import StudentConfig, TeacherConfig
    from asymsearch.training.student import train_student
    from asymsearch.training.teacher import train_teacher
    with timer.stage("train_teacher", f"train teacher ({cfg.teacher_backbone}, pretrained, "
                                      f"{estimate['sizes']['teacher']} px; zero-shot floor first), "
                                      f"{estimate['teacher_epochs']} epochs"):
        teacher_ckpt = train_teacher(TeacherConfig(
            data=str(data), out=str(work / "teacher.pt"), backbone=cfg.teacher_backbone, classes="first-half",
            image_size=cfg.teacher_size,
            epochs=estimate["teacher_epochs"], seed=cfg.seed, workers=0, trunk_cache=cfg.trunk_cache,
            **TEACHER_RECIPE))
    arch = _arch(teacher_ckpt)
    with timer.stage("train_student", f"train student (the teacher at {cfg.student_size} px, pretrained through "
                                      f"it), {estimate['student_epochs']} epochs"):
        student_ckpt = train_student(StudentConfig(
            data=str(data), teacher=str(teacher_ckpt), out=str(work / "student.pt"), backbone=arch["backbone"],
            head=arch["head"], image_size=cfg.student_size, classes="first-half", epochs=estimate["student_epochs"],
            seed=cfg.seed, workers=0, trunk_cache=cfg.trunk_cache, **STUDENT_RECIPE))
    return teacher_ckpt, student_ckpt


# per-image cost of the passes, in units of one forward pass of the network at that size, measured on this
# machine by `estimate_recipe` (calibrated on CUB-100 runs, docs/results/recipe.md)
PASS_COST = {"teacher_epoch": 0.45, "teacher_tail": 0.15, "student_epoch": 0.6, "fixed_seconds": 60.0}


def estimate_recipe(data: Path, cfg: DemoConfig) -> dict:
    """Minutes the real recipe will take on this machine now, and the epochs that fit `cfg.budget_min`: times one
    forward pass of the teacher's backbone at the teacher's and at the student's size on real images (decoding
    included), then counts the passes (trunk maps and teacher embeddings of the training half, index, evaluation
    and zero-shot evaluation of the other half; the student's maps and evaluation at its size). `UserError`
    when the fixed passes with one epoch each do not fit the budget."""
    import numpy as np
    import torch

    from asymsearch.core.data import list_image_folder, select_classes
    from asymsearch.core.preprocess import load_and_preprocess
    from asymsearch.training.models import backbone_preprocessing, create_backbone
    from asymsearch.training.teacher import teacher_preprocessing
    from asymsearch.training.config import TeacherConfig
    first = list_image_folder(data, select_classes(data, "first-half"))
    second = list_image_folder(data, select_classes(data, "second-half"))
    spec = teacher_preprocessing(TeacherConfig(data=str(data), out="", backbone=cfg.teacher_backbone,
                                               image_size=cfg.teacher_size))
    small = dataclasses.replace(spec, crop=cfg.student_size, resize=round(spec.resize * cfg.student_size / spec.crop))
    if cfg.student_size >= spec.crop:
        raise UserError(f"--student-size {cfg.student_size} is not smaller than the teacher's {spec.crop} px: the "
                        f"student would cost as much; give fewer pixels")
    backbone_preprocessing(cfg.teacher_backbone)
    net = create_backbone(cfg.teacher_backbone, "imagenet")[0].eval()
    sample = first[:: max(1, len(first) // 8)][:8]

    net = net.to(memory_format=torch.channels_last)  # as the feature-map passes run it

    def per_image(s) -> float:  # decoding + one forward, the best of 3 after a warm-up of the same shape
        with torch.no_grad():
            times = []
            for _ in range(4):
                t0 = time.perf_counter()
                x = torch.from_numpy(np.stack([load_and_preprocess(it.path, s) for it in sample]))
                net(x.contiguous(memory_format=torch.channels_last))
                times.append(time.perf_counter() - t0)
            return min(times[1:]) / len(sample)

    t_big, t_small = per_image(spec), per_image(small)
    n1, n2 = len(first), len(second)
    own = _own_size(cfg.teacher_backbone)
    t_own = t_big * (own / spec.crop) ** 2 if own != spec.crop else 0.0  # the zero-shot row at the own size
    # the teacher's trunk maps of the training half (its embeddings for the student run its tail on them), the
    # index, the evaluation and the zero-shot evaluation at its size; the student's maps and evaluation at its own,
    # and the zero-shot evaluation at the student's size
    fixed = ((1 + PASS_COST["teacher_tail"]) * n1 + 3 * n2) * t_big + n2 * t_own + (n1 + 2 * n2) * t_small \
        + PASS_COST["fixed_seconds"]
    teacher_epoch = PASS_COST["teacher_epoch"] * n1 * t_big
    student_epoch = PASS_COST["student_epoch"] * n1 * t_small
    budget = cfg.budget_min * 60
    if fixed + teacher_epoch + student_epoch > budget:
        need = (fixed + teacher_epoch + student_epoch) / 60
        raise UserError(f"the recipe on {n1 + n2} images needs about {need:.0f} min on this machine now (one "
                        f"{cfg.teacher_backbone} pass takes {t_big * 1e3:.0f} ms per image at {spec.crop} px): give "
                        f"--budget-min {int(need * 1.2) + 1} or fewer images")
    left = budget - fixed
    teacher_epochs = cfg.teacher_epochs or int(min(MAX_EPOCHS["teacher"], max(1, 0.4 * left // teacher_epoch)))
    student_epochs = cfg.student_epochs or int(min(MAX_EPOCHS["student"],
                                                   max(1, (left - teacher_epochs * teacher_epoch) // student_epoch)))
    total = fixed + teacher_epochs * teacher_epoch + student_epochs * student_epoch
    detail = (f"{n1} training and {n2} database images, {t_big * 1e3:.0f} ms per image at {spec.crop} px and "
              f"{t_small * 1e3:.0f} ms at {cfg.student_size} px, teacher {teacher_epochs} and student "
              f"{student_epochs} epochs")
    return {"minutes": total / 60, "seconds": total, "teacher_epochs": teacher_epochs,
            "student_epochs": student_epochs, "seconds_per_image": {"teacher": t_big, "student": t_small},
            "images": {"train": n1, "database": n2}, "sizes": {"teacher": spec.crop, "student": cfg.student_size},
            "detail": detail}


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
