"""`asymsearch bench embed`: torch eager against onnxruntime, teacher against student, fp32 against int8.

Each model embeds random pixels at its own input size (the teacher at its crop, the student at its own, which is
what a query and a database image cost); the candidates take turns round after round
(`asymsearch.core.timing.interleaved`), with the same thread count for torch and onnxruntime, so the ratios
printed are measured side by side on the same machine state. Every row reports wall time and this process's CPU
time per image; on a shared machine the CPU figure is the steadier one. Absolute figures are for scale only.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from asymsearch.core.errors import UserError
from asymsearch.core.manifest import check_pairing, require_teacher
from asymsearch.core.ort import CPU_PROVIDER, OnnxEmbedder, available_providers
from asymsearch.core.provenance import provenance
from asymsearch.core.timing import interleaved, summarise
from asymsearch.export.onnx_export import export_checkpoint
from asymsearch.export.variants import Calibration, make_variant, variant_path
from asymsearch.training.checkpoint import load_checkpoint, model_from_checkpoint

# (numerator, denominator): "how many times faster is the second than the first"
RATIOS = (("torch teacher", "ORT teacher"), ("torch student", "ORT student"), ("ORT student", "ORT int8 student"),
          ("torch student", "ORT int8 student"), ("torch teacher", "torch student"), ("ORT teacher", "ORT student"))


@contextlib.contextmanager
def _torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _torch_call(ckpt: dict, x: np.ndarray, device: str) -> Callable[[], object]:
    model = model_from_checkpoint(ckpt).to(device).eval()
    t = torch.from_numpy(x).to(device)

    def call():
        with torch.inference_mode():
            out = model(t)
        if device == "cuda":
            torch.cuda.synchronize()
        return out
    return call


def bench_embed(student: str | os.PathLike, *, teacher: str | os.PathLike | None = None,
                student_onnx: str | os.PathLike | None = None, teacher_onnx: str | os.PathLike | None = None,
                student_int8: str | os.PathLike | None = None, calibration: Calibration | None = None,
                batch_sizes: Sequence[int] = (1, 16), rounds: int = 10, threads: int = 1, device: str = "cpu",
                workdir: str | os.PathLike | None = None) -> dict:
    """Time torch eager and onnxruntime for the student (and the teacher, when given) and the int8 student, each
    at its own input size.

    Missing ONNX files are exported from the checkpoints into `workdir` (a temporary folder by default); a
    missing int8 student is made as int8-static when `calibration` is given, else int8-dynamic.
    Returns {"config", "rows": {name: {"batch1": {...}, ...}}, "ratios": {"A / B": {"batch1": x, ...}},
    "provenance"} where a row holds wall ms and CPU ms per image and a ratio is A's per-image wall latency over
    B's (above 1: B is faster).
    """
    if threads < 1:
        raise UserError(f"threads must be at least 1, not {threads}")
    if device not in ("cpu", "cuda"):
        raise UserError(f"device must be cpu or cuda, not {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: torch sees no CUDA device here")
    providers = available_providers() if device == "cuda" else [CPU_PROVIDER]
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="asymsearch-bench-"))
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        s_ckpt = load_checkpoint(student)
        t_ckpt = load_checkpoint(teacher) if teacher is not None else None
        if t_ckpt is not None:
            require_teacher(t_ckpt, str(teacher))
            check_pairing(s_ckpt, t_ckpt, query_name=str(student), database_name=str(teacher))
        if student_onnx is None:
            student_onnx = workdir / "student.onnx"
            export_checkpoint(student, student_onnx)
        if student_int8 is None:
            kind = "int8-static" if calibration is not None else "int8-dynamic"
            make_variant(student_onnx, kind, calibration=calibration)
            student_int8 = variant_path(student_onnx, kind)
        entries: dict[str, tuple[str, object]] = {}
        if t_ckpt is not None:
            if teacher_onnx is None:
                teacher_onnx = workdir / "teacher.onnx"
                export_checkpoint(teacher, teacher_onnx)
            entries["torch teacher"] = ("torch", t_ckpt)
            entries["ORT teacher"] = ("ort", teacher_onnx)
        entries["torch student"] = ("torch", s_ckpt)
        entries["ORT student"] = ("ort", student_onnx)
        entries["ORT int8 student"] = ("ort", student_int8)

        sessions = {name: OnnxEmbedder(src, providers=providers, intra_op_threads=threads, inter_op_threads=1)
                    for name, (kind, src) in entries.items() if kind == "ort"}
        for name, emb in sessions.items():
            check_pairing(emb, s_ckpt, database_name=str(student))
        crops = {name: (int(src["preprocessing"]["crop"]) if kind == "torch"
                        else sessions[name].manifest.preprocessing.crop) for name, (kind, src) in entries.items()}
        rows: dict[str, dict[str, dict]] = {name: {} for name in entries}
        rng = np.random.default_rng(0)
        with _torch_threads(threads):
            for batch in batch_sizes:
                pixels = {c: rng.normal(size=(batch, 3, c, c)).astype(np.float32) for c in sorted(set(crops.values()))}
                calls = {}
                for name, (kind, src) in entries.items():
                    x = pixels[crops[name]]
                    if kind == "torch":
                        calls[name] = _torch_call(src, x, device)
                    else:
                        calls[name] = (lambda e=sessions[name], x=x: e.embed_arrays(x))
                times = interleaved(calls, rounds=rounds, reps=max(1, 16 // batch), warmup=2)
                for name, t in times.items():
                    rows[name][f"batch{batch}"] = summarise(t.wall, batch, t.cpu)
        ratios = {}
        for a, b in RATIOS:
            if a in rows and b in rows:
                ratios[f"{a} / {b}"] = {k: rows[a][k]["ms_per_image"] / rows[b][k]["ms_per_image"] for k in rows[a]}
        files = {name: str(src) for name, (kind, src) in entries.items() if kind == "ort"}
        sizes = {name: os.path.getsize(p) for name, p in files.items()}
        config = {"student": str(student), "teacher": str(teacher) if teacher else None, "files": files,
                  "bytes": sizes, "threads": threads, "device": device, "rounds": rounds, "input_sizes": crops,
                  "batch_sizes": list(batch_sizes), "torch": torch.__version__,
                  "student_arch": s_ckpt["arch"], "teacher_arch": t_ckpt["arch"] if t_ckpt else None,
                  "int8_variant": sessions["ORT int8 student"].manifest.variant}
        return {"config": config, "rows": rows, "ratios": ratios, "provenance": provenance()}


def format_bench(result: dict) -> str:
    batches = result["config"]["batch_sizes"]
    sizes = result["config"]["input_sizes"]
    head = ["model", "input px"] + [f"{h} b{b}" for b in batches for h in ("ms/img", "CPU ms/img", "img/s")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in result["rows"].items():
        cells = [name, str(sizes[name])]
        for b in batches:
            s = row[f"batch{b}"]
            cells += [f"{s['ms_per_image']:.2f}", f"{s['cpu_ms_per_image']:.2f}", f"{s['images_per_s']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| ratio (per-image wall latency, above 1: the second is faster) | " +
              " | ".join(f"b{b}" for b in batches) + " |", "|---|" + "---|" * len(batches)]
    for name, r in result["ratios"].items():
        lines.append(f"| {name} | " + " | ".join(f"{r[f'batch{b}']:.2f}" for b in batches) + " |")
    return "\n".join(lines)
