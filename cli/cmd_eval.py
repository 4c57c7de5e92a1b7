"""`asymsearch eval`: Recall@K, mAP, precision@1 and MAP@R in the three settings, for any (query model, database
model) pair, or on the revisited Oxford/Paris protocol."""
from __future__ import annotations

import argparse
import json

from asymsearch.cli.cmd_index import index_location
from asymsearch.cli.options import CONFIG_HELP, Commands, bind_config, existing_path


def register(commands: Commands) -> None:
    p = commands.add("eval", help="Recall@K, mAP, P@1, MAP@R: teacher-teacher, student-student, student-teacher",
                     description="Leave-one-out retrieval metrics on a labelled image folder. With --teacher and "
                                 "--student: the three settings. With --query-model and --database-model: that "
                                 "one pair. With --revisited GND.pkl (and the two models): the revisited "
                                 "Oxford/Paris easy/medium/hard protocol on the data set's images in --data.")
    p.add_argument("--data", required=True, type=existing_path("image folder"),
                   help="labelled image folder (with --revisited: the folder of the data set's .jpg files)")
    p.add_argument("--teacher", type=existing_path("teacher ONNX model"))
    p.add_argument("--student", type=existing_path("student ONNX model"))
    p.add_argument("--query-model", type=existing_path("query ONNX model"),
                   help="embeds the queries (any model of the teacher's space)")
    p.add_argument("--database-model", type=existing_path("database ONNX model"),
                   help="embeds the database (any model of the same space)")
    p.add_argument("--revisited", type=existing_path("ground-truth file"),
                   help="a revisited Oxford/Paris gnd_*.pkl: evaluate the query/database pair on that protocol")
    p.add_argument("--index", type=index_location("index folder"),
                   help="query this built index (a folder, or a Milvus location milvus://... / milvus-lite://...) "
                        "for the asymmetric setting instead of an in-memory database")
    p.add_argument("--classes", default="unseen",
                   help=CONFIG_HELP["classes"] + ", or unseen: every class no given model trained or validated on "
                        "(as their manifests record; all classes, with a note, when none records them). The "
                        "project's protocol evaluates on second-half; a warning names the classes a model trained "
                        "or validated on (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--multiscale", action="store_true",
                   help="embed every image (queries and database) at scales 1, 1/sqrt(2), 1/2 of the model's size, "
                        "average and re-normalise (the models need dynamic height/width, as exported ones have)")
    p.add_argument("--flip", action="store_true",
                   help="also embed every image (queries and database) mirrored left-right and average: the "
                        "descriptor of an index built with --flip")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object")
    p.set_defaults(func=run, parser=p)
    bind_config(p)  # every option is a key: --config FILE.yaml and KEY=VALUE


def _recorded_classes(models) -> dict[str, set]:
    """{model file name: the classes it trained or validated on} for the ONNX `models` whose manifests record
    them (training writes them into the checkpoint, export into the manifest's extra)."""
    from pathlib import Path

    from asymsearch.core.errors import ManifestError
    from asymsearch.core.manifest import ModelManifest, manifest_path_for
    seen: dict[str, set] = {}
    for model in sorted({str(m) for m in models if m is not None}):
        try:
            extra = ModelManifest.load(manifest_path_for(Path(model))).extra
        except ManifestError:
            continue
        if "train_classes" in extra or "val_classes" in extra:
            seen[Path(model).name] = set(extra.get("train_classes", []) + extra.get("val_classes", []))
    return seen


def resolve_classes(data, classes: str, models) -> tuple[str, str | None]:
    """(the class spec to evaluate on, a note for stderr or None). `unseen`: the class folders of `data` that no
    model of `models` records having trained or validated on, as a comma-separated list; every class, with a
    note, when no model records its classes. Other specs pass through. `UserError` when every class was seen."""
    from asymsearch.core.data import class_names
    from asymsearch.core.errors import UserError
    if classes != "unseen":
        return classes, None
    names = class_names(data)
    seen = _recorded_classes(models)
    if not seen:
        return "all", (f"note: no model records the classes it trained on: evaluating on all {len(names)} "
                       f"classes (--classes second-half is the project's protocol)")
    used = set().union(*seen.values())
    unseen = [c for c in names if c not in used]
    if not unseen:
        raise UserError(f"every class of {data} was seen in training by {', '.join(seen)}: nothing unseen to "
                        f"evaluate on (give --classes explicitly, or a folder of other classes)")
    if any("," in c for c in unseen):
        raise UserError("a class folder name holds a comma: give --classes second-half or a list explicitly")
    return ",".join(unseen), f"note: evaluating on the {len(unseen)} of {len(names)} classes no model trained on"


def seen_classes_warning(data, classes: str, models) -> str | None:
    """A one-line warning when the classes `classes` selects in `data` include classes one of `models` (ONNX
    files) trained or validated on (recorded by training in the checkpoint, by export in the manifest's extra);
    None when they are all unseen, or when no model records its classes."""
    from pathlib import Path

    from asymsearch.core.data import select_classes
    from asymsearch.core.errors import ManifestError
    from asymsearch.core.manifest import ModelManifest, manifest_path_for
    wanted = set(select_classes(data, classes))
    seen: dict[str, set] = {}
    for model in {str(m) for m in models if m is not None}:
        try:
            extra = ModelManifest.load(manifest_path_for(Path(model))).extra
        except ManifestError:
            continue
        overlap = wanted & set(extra.get("train_classes", []) + extra.get("val_classes", []))
        if overlap:
            seen[Path(model).name] = overlap
    if not seen:
        return None
    union = sorted(set().union(*seen.values()))
    return (f"warning: {len(union)} of the {len(wanted)} evaluation classes ({', '.join(union[:3])}"
            f"{', ...' if len(union) > 3 else ''}) were seen in training by {', '.join(sorted(seen))}: these "
            f"figures are not on unseen classes (evaluate with --classes second-half)")


def run(args: argparse.Namespace) -> int:
    import sys

    from asymsearch.index.evaluate import evaluate, evaluate_pair, evaluate_revisited, format_table
    note = None
    if args.revisited is None:
        models = [args.teacher, args.student, args.query_model, args.database_model]
        args.classes, note = resolve_classes(args.data, args.classes, models)
        warning = seen_classes_warning(args.data, args.classes, models)
        if warning:
            print(warning, file=sys.stderr)
    pair = args.query_model is not None or args.database_model is not None
    if pair or args.revisited is not None:
        if args.query_model is None or args.database_model is None:
            args.parser.error("--query-model and --database-model go together (and --revisited needs both)")
        if args.teacher is not None or args.student is not None or args.index is not None:
            args.parser.error("use either --teacher/--student [--index] or --query-model/--database-model")
        if args.revisited is not None:
            result = evaluate_revisited(args.data, args.revisited, args.query_model, args.database_model,
                                        batch_size=args.batch_size, progress=not args.json,
                                        multiscale=args.multiscale, flip=args.flip)
        else:
            result = {"query_database": evaluate_pair(args.data, args.query_model, args.database_model,
                                                      classes=args.classes, batch_size=args.batch_size,
                                                      progress=not args.json, multiscale=args.multiscale,
                                                      flip=args.flip)}
    else:
        if args.teacher is None or args.student is None:
            args.parser.error("give --teacher and --student, or --query-model and --database-model")
        result = evaluate(args.data, args.teacher, args.student, index=args.index, classes=args.classes,
                          batch_size=args.batch_size, progress=not args.json, multiscale=args.multiscale,
                          flip=args.flip)
    if note and not args.json:  # after the run, so that a refusal stays the one line it is
        print(note, file=sys.stderr)
    print(json.dumps(result) if args.json else format_table(result))
    return 0
