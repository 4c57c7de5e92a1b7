"""The upgrade experiment of docs/results/upgrades.md (issue 25, item 3): compatible teachers and index transforms.

`python -m experiments.upgrades prefill --teacher T.pt ...` writes a teacher's embeddings of the training images
into the student trainer's teacher cache (`training.teacher_cache`, the same key `train student` looks up),
computed from the cached trunk maps (`training.trunk`) instead of a second full pass of the teacher.

`python -m experiments.upgrades evaluate --seeds 0,1 ...` embeds the evaluation half with every teacher and student
of each seed (their trained tails on the cached float16 trunk maps of the frozen, pretrained trunks), then reports
the Recall@1 / mAP of each pairing, and learns the OLD -> NEW vector map (`index.transform.fit_map`) on the training
half, its kind chosen on validation classes carved from the training half, before it is applied to OLD's
evaluation-half vectors once.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from asymsearch.core.manifest import Preprocessing
from asymsearch.core.metrics import retrieval_metrics
from asymsearch.core.provenance import provenance
from asymsearch.training.checkpoint import load_checkpoint, model_from_checkpoint
from asymsearch.training.common import prepare_data
from asymsearch.training.teacher_cache import cached_array, items_fingerprint
from asymsearch.training.trunk import TailNet, trunk_maps


def embed(ckpt: dict, items, cache: str) -> np.ndarray:
    """(N, d) unit embeddings of `items` by the checkpoint's model: its tail + head on the frozen trunk's maps."""
    cfg = ckpt["config"]
    tune = int(cfg["tune_units"])
    spec = Preprocessing.from_dict(ckpt["preprocessing"])
    maps = trunk_maps(items, ckpt["arch"]["backbone"], cfg["pretrained"], spec, tune, cache, torch.device("cpu"),
                      log=lambda m: print(m, file=sys.stderr))[0]
    net = TailNet(model_from_checkpoint(ckpt), tune).eval()
    out = []
    with torch.no_grad():
        for lo in range(0, len(maps), 128):
            out.append(net(torch.from_numpy(np.asarray(maps[lo:lo + 128], np.float32))).numpy())
    return np.concatenate(out)


def run_prefill(args) -> None:
    items = prepare_data(args.data, args.classes, 0.0)[0]
    old = load_checkpoint(args.mix_old) if args.mix_old else None
    for path in args.teacher:
        ckpt = load_checkpoint(path)
        spec = Preprocessing.from_dict(ckpt["preprocessing"])
        tid = ckpt["model_id"]
        key = {"kind": "teacher-embeddings", "teacher_id": tid, "preprocessing": spec.to_dict(),
               "augmentation": "none", "items": items_fingerprint(items), "count": len(items)}

        def compute(ckpt=ckpt) -> np.ndarray:
            t = embed(ckpt, items, args.trunk_cache)
            if old is None:
                return t
            # the student's regression target: the direction of t_new + w * t_old, i.e. the minimiser of
            # |s - t_new|^2 + w |s - t_old|^2 over unit s (a student that must query the old index as well)
            mixed = t + args.mix_weight * embed(old, items, args.trunk_cache)
            return (mixed / np.linalg.norm(mixed, axis=1, keepdims=True)).astype(np.float32)
        cached_array(args.cache_dir, f"teacher-{tid}", key, compute, log=print)


def fit_val_items(data: str):
    """(training-half items, the fit items, the validation items): validation = every 5th class of the training
    half (`training.common.prepare_data` with 0.2), fit = the other 40; the lists `--classes A,B,...` gives."""
    train_items = prepare_data(data, "first-half", 0.0)[0]
    fit_items, val_items, _ = prepare_data(data, "first-half", 0.2)
    return train_items, fit_items, val_items


def run_split_cache(args) -> None:
    """Write the trunk-map caches of the fit and validation classes as slices of the training half's, so runs on
    the 40 fit classes (`--classes A,B,...`) find their maps without a second pass of the trunk."""
    from asymsearch.training.featcache import cache_key, feature_maps
    train_items, fit_items, val_items = fit_val_items(args.data)
    rows = {str(it.path): i for i, it in enumerate(train_items)}
    for path in args.checkpoint:
        ckpt = load_checkpoint(path)
        cfg, spec = ckpt["config"], Preprocessing.from_dict(ckpt["preprocessing"])
        backbone, tune = ckpt["arch"]["backbone"], int(cfg["tune_units"])
        full = feature_maps(train_items, backbone, cfg["pretrained"], spec, args.trunk_cache, tail_units=tune)
        cache = Path(args.trunk_cache)
        for items in (fit_items, val_items):
            key = cache_key(backbone, cfg["pretrained"], spec, items, tune)
            if (cache / f"{key}.npy").is_file():
                continue
            sub = np.asarray(full.maps[[rows[str(it.path)] for it in items]])
            np.save(cache / f".{key}.tmp.npy", sub)
            (cache / f".{key}.tmp.npy").rename(cache / f"{key}.npy")
            (cache / f"{key}.json").write_text(json.dumps({"backbone": backbone, "pretrained": cfg["pretrained"],
                                                           "spec": spec.to_dict(), "tail_units": tune, "view": 0,
                                                           "paths": [str(it.path) for it in items],
                                                           "sliced_from": "training half"}, indent=1))
            print(f"{path}: {len(items)} maps sliced into {key}")


def run_prefill_old(args) -> None:
    """The old teacher's embeddings that `train teacher --compatible-with OLD.onnx` reads (`training.compat.
    old_embeddings`, its cache beside --trunk-cache), computed from the cached trunk maps instead of a pass of the
    ONNX model over the images (the two agree to cosine 1.0000; docs/results/upgrades.md)."""
    from asymsearch.core.ort import OnnxEmbedder
    ckpt = load_checkpoint(args.old)
    manifest = OnnxEmbedder(args.onnx, warmup=False).manifest
    if manifest.teacher_id != ckpt["model_id"] or manifest.preprocessing.to_dict() != ckpt["preprocessing"]:
        raise SystemExit(f"{args.onnx} is not the export of {args.old}")
    train_items, fit_items, _ = fit_val_items(args.data)
    for items in ([train_items] if args.classes == "first-half" else [fit_items] if args.classes == "fit" else
                  [train_items, fit_items]):
        key = {"kind": "old-teacher-embeddings", "teacher_id": manifest.teacher_id,
               "preprocessing": manifest.preprocessing.to_dict(), "augmentation": "none",
               "items": items_fingerprint(items), "count": len(items)}
        cached_array(Path(args.trunk_cache).expanduser().parent / "old-teacher", f"old-teacher-{manifest.teacher_id}",
                     key, lambda items=items: embed(ckpt, items, args.trunk_cache), log=print)


def run_select_student(args) -> None:
    """The weight of OLD's vectors in the target of the compatible teacher's student, chosen on the validation
    classes among students trained on the other 40: the candidate with the best Recall@1 on the compatible
    teacher's vectors among those whose Recall@1 on OLD's vectors is >= OLD's own student's there (no regression on
    the old index); when none is, the one best on OLD's vectors."""
    _, _, val_items = fit_val_items(args.data)
    labels = np.array([it.label for it in val_items])
    old = embed(load_checkpoint(args.old), val_items, args.trunk_cache)
    newc = embed(load_checkpoint(args.newc), val_items, args.trunk_cache)
    bar = metrics(embed(load_checkpoint(args.old_student), val_items, args.trunk_cache), labels, old, labels)
    out = {"what": "weight of OLD's vectors in the compatible teacher's student's target, chosen on validation "
                   "classes carved from the training half (students trained on the other 40 classes)",
           "old_student_to_old": bar, "candidates": {}, "provenance": provenance()}
    for path in args.candidates:
        q = embed(load_checkpoint(path), val_items, args.trunk_cache)
        out["candidates"][path] = {"to_old": metrics(q, labels, old, labels), "to_newc": metrics(q, labels, newc,
                                                                                                  labels)}
    c = out["candidates"]
    ok = [k for k in c if c[k]["to_old"]["recall@1"] >= bar["recall@1"]]
    out["chosen"] = (max(ok, key=lambda k: (c[k]["to_newc"]["recall@1"], c[k]["to_old"]["recall@1"])) if ok else
                     max(c, key=lambda k: (c[k]["to_old"]["recall@1"], c[k]["to_old"]["map"])))
    print(json.dumps(out, indent=1))
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


def run_select(args) -> None:
    """The compatibility weight, chosen on the validation classes (every 5th class of the training half) among
    teachers trained on the other 40: each candidate's new-to-old Recall@1 (its queries against OLD's vectors of
    the validation images) and its own Recall@1 against the unconstrained NEW trained on the same 40 classes; the
    candidate with the best new-to-old Recall@1 among those keeping >= 0.98x NEW's."""
    _, fit_items, val_items = fit_val_items(args.data)
    labels = np.array([it.label for it in val_items])
    old_ckpt = load_checkpoint(args.old)
    old = embed(old_ckpt, val_items, args.trunk_cache)
    old_fit = embed(old_ckpt, fit_items, args.trunk_cache) if args.fit_cosines else None
    new = embed(load_checkpoint(args.new), val_items, args.trunk_cache)
    out = {"what": "compatibility weight chosen on validation classes carved from the training half (every 5th "
                   "class; the candidates and NEW trained on the other 40 classes)",
           "val_classes": sorted(set(labels.tolist())), "old_old": metrics(old, labels, old, labels),
           "new_new": metrics(new, labels, new, labels), "new_old": metrics(new, labels, old, labels),
           "new_cosine_to_old": same_image_cosine(new, old), "candidates": {}, "provenance": provenance()}
    for path in args.candidates:
        ckpt = load_checkpoint(path)
        e = embed(ckpt, val_items, args.trunk_cache)
        own, cross = metrics(e, labels, e, labels), metrics(e, labels, old, labels)
        out["candidates"][path] = {"self": own, "to_old": cross,
                                   "self_ratio": round(own["recall@1"] / out["new_new"]["recall@1"], 4),
                                   "cosine_to_old": same_image_cosine(e, old)}
        if old_fit is not None:  # how closely the regression fit OLD's vectors of its own training images
            out["candidates"][path]["cosine_to_old_fit_images"] = same_image_cosine(
                embed(ckpt, fit_items, args.trunk_cache), old_fit)
    ok = {k: v for k, v in out["candidates"].items() if v["self_ratio"] >= 0.98}
    out["chosen"] = max(ok, key=lambda k: (ok[k]["to_old"]["recall@1"], ok[k]["to_old"]["map"])) if ok else None
    print(json.dumps(out, indent=1))
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


def same_image_cosine(a: np.ndarray, b: np.ndarray) -> dict:
    """How close two models' unit vectors of the same images are: the mean cosine of each image's pair, and the
    share of images whose nearest vector in `b` (itself included) is its own (1 for a model regressed onto b)."""
    sims = a @ b.T
    return {"mean": round(float(np.mean(np.diag(sims))), 4),
            "own_is_nearest": round(float(np.mean(np.argmax(sims, axis=1) == np.arange(len(a)))), 4)}


def metrics(q, ql, db, dbl) -> dict:
    m = retrieval_metrics(q, ql, db, dbl, exclude_self=True)
    return {"recall@1": round(float(m["recall@1"]), 4), "map": round(float(m["map"]), 4)}


def learn_map(ck: dict, args, seed: int):
    """The OLD -> NEW map learned on training-half pairs, its kind chosen on validation classes (every 5th class of
    the training half: fit on the others, NEW's student querying the mapped validation vectors); then refit on the
    whole training half. (map, validation figures, chosen kind, seconds of the final fit)."""
    from asymsearch.index.transform import fit_map
    train_items = prepare_data(args.data, "first-half", 0.0)[0]
    fit_items, val_items, _ = prepare_data(args.data, "first-half", 0.2)
    fit_paths = {it.path for it in fit_items}
    fit_rows = np.array([it.path in fit_paths for it in train_items])
    val_rows = ~fit_rows
    val_labels = np.array([it.label for it in train_items])[val_rows]
    assert val_rows.sum() == len(val_items)
    t_old = embed(ck["old"], train_items, args.trunk_cache)
    t_new = embed(ck["new"], train_items, args.trunk_cache)
    s_new = embed(ck["st_new"], train_items, args.trunk_cache)
    choice = {}
    for kind in ("linear", "mlp"):
        m = fit_map(t_old[fit_rows], t_new[fit_rows], kind, seed=seed)
        choice[kind] = metrics(s_new[val_rows], val_labels, m(t_old[val_rows]), val_labels)
    chosen = max(choice, key=lambda k: (choice[k]["recall@1"], choice[k]["map"]))
    start = time.perf_counter()
    m = fit_map(t_old, t_new, chosen, seed=seed)
    fit_s = time.perf_counter() - start
    m.fit.update(old_teacher_id=ck["old"]["model_id"], new_teacher_id=ck["new"]["model_id"],
                 pairs_from="training half (classes 1-50), embedded from the cached trunk maps")
    return m, choice, chosen, fit_s


def run_fit_map(args) -> None:
    root = Path(args.runs)
    ck = {name: load_checkpoint(root / f"{name}_s{args.seed}.pt") for name in ("old", "new", "st_new")}
    m, choice, chosen, fit_s = learn_map(ck, args, args.seed)
    m.save(root / f"map_s{args.seed}.npz")
    print(json.dumps({"map_validation": choice, "map_chosen": chosen, "map_fit_seconds": fit_s}))


def run_evaluate(args) -> None:
    root = Path(args.runs)
    eval_items = prepare_data(args.data, "second-half", 0.0)[0]
    labels = np.array([it.label for it in eval_items])
    result = {"what": "issue 25 item 3: compatible teacher upgrades and index transforms on CUB-100",
              "data": args.data, "selection": "map kind chosen on validation classes (every 5th class of the "
              "training half); nothing chosen on the evaluation half, which is reported once",
              "seeds": {}, "provenance": provenance()}
    for seed in args.seeds:
        ck = {name: load_checkpoint(root / f"{name}_s{seed}.pt") for name in
              ("old", "new", "newc", "st_old", "st_newc")}
        for name in ("st_new", "st_newcp", "newr", "st_newr"):  # present in some runs only
            if (root / f"{name}_s{seed}.pt").is_file():
                ck[name] = load_checkpoint(root / f"{name}_s{seed}.pt")
        e = {name: embed(c, eval_items, args.trunk_cache) for name, c in ck.items()}
        r = {
            "OLD -> OLD (teacher, reference)": metrics(e["old"], labels, e["old"], labels),
            "NEW -> NEW (unconstrained teacher)": metrics(e["new"], labels, e["new"], labels),
            "NEWc -> NEWc (compatible teacher)": metrics(e["newc"], labels, e["newc"], labels),
            "NEWc -> OLD index (teacher, new-to-old)": metrics(e["newc"], labels, e["old"], labels),
            "NEW -> OLD index (unconstrained, new-to-old)": metrics(e["new"], labels, e["old"], labels),
            "OLD's student -> OLD index": metrics(e["st_old"], labels, e["old"], labels),
            "NEWc's student -> OLD index": metrics(e["st_newc"], labels, e["old"], labels),
            "NEWc's student -> NEWc index": metrics(e["st_newc"], labels, e["newc"], labels),
        }
        if "st_newcp" in e:  # NEWc's student regressed onto NEWc alone (no OLD vectors in its target)
            r["NEWc's plain student -> OLD index"] = metrics(e["st_newcp"], labels, e["old"], labels)
            r["NEWc's plain student -> NEWc index"] = metrics(e["st_newcp"], labels, e["newc"], labels)
        if "st_new" in e:
            r["NEW's student -> OLD index (not compatible)"] = metrics(e["st_new"], labels, e["old"], labels)
            r["NEW's student -> NEW index (re-embedded)"] = metrics(e["st_new"], labels, e["new"], labels)
        if "newr" in e:
            r.update({
                "NEWr -> NEWr (compatible + regression)": metrics(e["newr"], labels, e["newr"], labels),
                "NEWr -> OLD index (teacher, new-to-old)": metrics(e["newr"], labels, e["old"], labels),
            })
        if "st_newr" in e:
            r["NEWr's student -> OLD index"] = metrics(e["st_newr"], labels, e["old"], labels)
        targets = {"newc_self_over_new": round(r["NEWc -> NEWc (compatible teacher)"]["recall@1"]
                                               / r["NEW -> NEW (unconstrained teacher)"]["recall@1"], 4),
                   "newc_student_on_old_minus_old_student": round(r["NEWc's student -> OLD index"]["recall@1"]
                                                                  - r["OLD's student -> OLD index"]["recall@1"], 4)}
        result["seeds"][str(seed)] = {"rows": r, "targets": targets,
                                      "teacher_ids": {k: c["model_id"] for k, c in ck.items()}}
        if "st_new" not in ck:
            print(json.dumps(result["seeds"][str(seed)], indent=1))
            continue
        m, choice, chosen, fit_s = learn_map(ck, args, seed)
        start = time.perf_counter()
        mapped = m(e["old"])
        apply_s = time.perf_counter() - start
        r["NEW's student -> OLD index transformed to NEW"] = metrics(e["st_new"], labels, mapped, labels)
        r["NEW -> OLD index transformed to NEW (teacher)"] = metrics(e["new"], labels, mapped, labels)
        result["seeds"][str(seed)].update(map_validation=choice, map_chosen=chosen, map_fit_seconds=fit_s,
                                          map_apply_seconds=apply_s)
        print(json.dumps(result["seeds"][str(seed)], indent=1))
        if args.save_map:
            m.save(root / f"map_s{seed}.npz")
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


def index_vectors(path: str) -> tuple[list[str], np.ndarray]:
    """(paths in id order, vectors) of the live version of an index, read back from faiss and its metadata."""
    import faiss

    from asymsearch.index.store import SearchIndex
    from asymsearch.index.transform import stored_blocks
    with SearchIndex.open(path, gpu=False) as index:
        folder = index.folder
        ids, vectors = zip(*stored_blocks(faiss.read_index(str(Path(folder) / "index.faiss"))))
        ids = np.concatenate(ids)
        paths = [p for p, _ in index.lookup([int(i) for i in ids])]
    return paths, np.concatenate(vectors)


def run_check_index(args) -> None:
    """Recall@1 of a student (its tail on the cached maps) querying the vectors the product's indexes store."""
    items = prepare_data(args.data, "second-half", 0.0)[0]
    by_path = {str(it.path): i for i, it in enumerate(items)}
    labels = np.array([it.label for it in items])
    q = embed(load_checkpoint(args.student), items, args.trunk_cache)
    out = {"student": args.student, "indexes": {}, "provenance": provenance()}
    for path in args.index:
        paths, vectors = index_vectors(path)
        rows = np.array([by_path[p] for p in paths])
        out["indexes"][path] = {"count": len(paths), **metrics(q, labels, vectors[np.argsort(rows)], labels)}
        if args.teacher:  # the product's vectors against the teacher's tail on the cached float16 maps
            t = embed(load_checkpoint(args.teacher), items, args.trunk_cache)
            cos = np.sum(vectors[np.argsort(rows)] * t, axis=1)
            out["indexes"][path]["cosine_to_cached_map_embedding"] = {"mean": float(cos.mean()),
                                                                      "min": float(cos.min())}
    print(json.dumps(out, indent=1))
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.upgrades")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prefill")
    a.add_argument("--data", required=True)
    a.add_argument("--classes", default="first-half")
    a.add_argument("--teacher", nargs="+", required=True)
    a.add_argument("--cache-dir", required=True)
    a.add_argument("--trunk-cache", required=True)
    a.add_argument("--mix-old", help="old teacher checkpoint: write normalise(t + w * t_old) instead of t")
    a.add_argument("--mix-weight", type=float, default=1.0)
    a.set_defaults(func=run_prefill)
    sc = sub.add_parser("split-cache")
    sc.add_argument("--data", required=True)
    sc.add_argument("--checkpoint", nargs="+", required=True)
    sc.add_argument("--trunk-cache", required=True)
    sc.set_defaults(func=run_split_cache)
    po = sub.add_parser("prefill-old")
    po.add_argument("--data", required=True)
    po.add_argument("--old", required=True, help="the old teacher's checkpoint")
    po.add_argument("--onnx", required=True, help="its export, as --compatible-with takes it")
    po.add_argument("--classes", choices=("first-half", "fit", "both"), default="both")
    po.add_argument("--trunk-cache", required=True)
    po.set_defaults(func=run_prefill_old)
    se = sub.add_parser("select")
    se.add_argument("--data", required=True)
    se.add_argument("--old", required=True)
    se.add_argument("--new", required=True, help="the unconstrained NEW trained on the 40 fit classes")
    se.add_argument("--candidates", nargs="+", required=True)
    se.add_argument("--trunk-cache", required=True)
    se.add_argument("--out", required=True)
    se.add_argument("--fit-cosines", action="store_true",
                    help="also the candidates' cosine to OLD on the images they trained on (the fit classes)")
    se.set_defaults(func=run_select)
    ss = sub.add_parser("select-student")
    ss.add_argument("--data", required=True)
    ss.add_argument("--old", required=True, help="OLD's teacher checkpoint")
    ss.add_argument("--old-student", required=True, help="OLD's student trained on the 40 fit classes")
    ss.add_argument("--newc", required=True, help="the compatible teacher the candidates are students of")
    ss.add_argument("--candidates", nargs="+", required=True)
    ss.add_argument("--trunk-cache", required=True)
    ss.add_argument("--out", required=True)
    ss.set_defaults(func=run_select_student)
    b = sub.add_parser("evaluate")
    b.add_argument("--data", required=True)
    b.add_argument("--runs", required=True, help="folder with {old,new,newc,st_old,st_newc}_sS.pt (and optionally st_new, st_newcp, newr, "
                                          "st_newr)")
    b.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1])
    b.add_argument("--trunk-cache", required=True)
    b.add_argument("--save-map", action="store_true")
    b.add_argument("--out", required=True)
    b.set_defaults(func=run_evaluate)
    f = sub.add_parser("fit-map")
    f.add_argument("--data", required=True)
    f.add_argument("--runs", required=True)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--trunk-cache", required=True)
    f.set_defaults(func=run_fit_map)
    c = sub.add_parser("check-index")
    c.add_argument("--data", required=True)
    c.add_argument("--student", required=True)
    c.add_argument("--index", nargs="+", required=True)
    c.add_argument("--teacher", help="compare the stored vectors with this teacher's cached-map embeddings")
    c.add_argument("--trunk-cache", required=True)
    c.add_argument("--out", required=True)
    c.set_defaults(func=run_check_index)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    args.func(args)


if __name__ == "__main__":
    main()
