"""Artifact manifests: the JSON files that travel beside every ONNX model and index folder.

A model `NAME.onnx` has `NAME.json`; an index folder has `manifest.json`. The teacher id ties them together:
a teacher's manifest carries its own id, a student's the id of the teacher it was trained against, and an
index the id of the teacher that embedded it. A student may query an index only when the two ids agree.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from asymsearch.core.errors import ManifestError, PairingError

MODEL_FORMAT = 1
INDEX_FORMAT = 1

# What a model file is, relative to the fp32 export of the same checkpoint (the "parent" of every other variant).
VARIANTS = ("fp32", "optimized", "fp16", "int8-dynamic", "int8-static", "ort")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How pixels are prepared: shorter side resized to `resize`, centre crop `crop`, then (x/255 - mean) / std."""

    resize: int
    crop: int
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocessing":
        return cls(resize=int(d["resize"]), crop=int(d["crop"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
                   interpolation=d.get("interpolation", "bilinear"))

    def to_dict(self) -> dict[str, Any]:
        return {"resize": self.resize, "crop": self.crop, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation}


@dataclasses.dataclass(frozen=True)
class ModelManifest:
    """What `asymsearch export` writes beside `NAME.onnx` as `NAME.json`."""

    role: str  # "teacher" or "student"
    architecture: dict[str, Any]  # backbone, head, dim, ... as the checkpoint recorded them
    dim: int
    input_size: int
    preprocessing: Preprocessing
    opset: int
    sha256: str
    teacher_id: str  # a teacher's own id, or the id of the teacher a student was trained against
    model_id: str  # this model's own id (equal to teacher_id for a teacher)
    input_name: str = "images"
    output_name: str = "embeddings"
    format: int = MODEL_FORMAT
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    # "fp32" for the plain export; a variant derived from it ("fp16", "int8-static", ...) records the sha256 of
    # the fp32 file it was made from. Manifests written before variants existed read as fp32 with no parent.
    variant: str = "fp32"
    parent_sha256: str | None = None

    def __post_init__(self) -> None:
        if self.role not in ("teacher", "student"):
            raise ManifestError(f"manifest role must be 'teacher' or 'student', not {self.role!r}")
        if self.variant not in VARIANTS:
            raise ManifestError(f"manifest variant must be one of {', '.join(VARIANTS)}, not {self.variant!r}")
        if self.role == "student" and not self.teacher_id:
            raise ManifestError("a student manifest needs teacher_id, the id of the teacher it was trained against")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["preprocessing"] = self.preprocessing.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelManifest":
        d = dict(d)
        d["preprocessing"] = Preprocessing.from_dict(d["preprocessing"])
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ModelManifest":
        """Read a manifest; unknown keys are ignored and keys added later take their defaults, so older files
        load. A missing required key or a malformed value raises `ManifestError` naming the file."""
        data = read_json(path, "model manifest")
        if not isinstance(data, dict):
            raise ManifestError(f"model manifest {path} is not a JSON object")
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name not in data and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ManifestError(f"model manifest {path} lacks {', '.join(missing)}")
        try:
            return cls.from_dict(data)
        except ManifestError as e:
            raise ManifestError(f"model manifest {path}: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"model manifest {path} is malformed ({e.__class__.__name__}: {e})") from None


@dataclasses.dataclass(frozen=True)
class IndexManifest:
    """What `asymsearch index build` writes as `INDEX_DIR/manifest.json`."""

    teacher_id: str
    dim: int
    metric: str  # "inner_product"
    factory: str  # faiss index_factory string, e.g. "Flat"
    count: int
    teacher_model: dict[str, Any]  # path and sha256 of the teacher ONNX that embedded the database
    build: dict[str, Any]  # the build's configuration and its skipped files
    search_params: dict[str, Any] = dataclasses.field(default_factory=dict)
    format: int = INDEX_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "IndexManifest":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "IndexManifest":
        return cls.from_dict(read_json(path, "index manifest"))


def manifest_path_for(onnx_path: str | os.PathLike) -> Path:
    """`student.onnx` -> `student.json`."""
    return Path(onnx_path).with_suffix(".json")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class Space:
    """The embedding space an artifact lives in: the teacher that defines it and its dimension. `what` names the
    artifact in messages and `says` how it relates to its teacher ("belongs to teacher X", "was embedded by ...")."""

    teacher_id: str
    dim: int
    what: str
    says: str
    # the old teacher ids this side was trained compatible with (training.compat; a model manifest's
    # extra.compatible_with, a checkpoint's config.compatible_with_teacher): it may also query their indexes
    compatible_with: tuple[str, ...] = ()


def space_of(x: Any, what: str | None = None) -> Space:
    """The space of a model manifest, an index manifest, anything with a `.manifest` (an ONNX embedder), a
    checkpoint dict (`role`, `teacher_id`, `arch.dim`) or a server's `Info` dict (`teacher_id`, `dim`)."""
    if isinstance(x, IndexManifest):
        return Space(x.teacher_id, int(x.dim), what or "the index", f"was embedded by teacher {x.teacher_id}")
    if not isinstance(x, (ModelManifest, dict)) and isinstance(getattr(x, "manifest", None), ModelManifest):
        what = what or str(getattr(x, "path", None) or "the model")
        x = x.manifest
    if isinstance(x, ModelManifest):
        says = f"is teacher {x.teacher_id}" if x.role == "teacher" else f"belongs to teacher {x.teacher_id}"
        return Space(x.teacher_id, int(x.dim), what or f"the {x.role}", says,
                     tuple(str(c) for c in (x.extra or {}).get("compatible_with") or ()))
    if isinstance(x, dict) and "role" in x and "arch" in x:  # a training checkpoint
        tid = x["teacher_id"]
        says = f"is teacher {tid}" if x["role"] == "teacher" else f"belongs to teacher {tid}"
        old = (x.get("config") or {}).get("compatible_with_teacher")
        return Space(tid, int(x["arch"]["dim"]), what or f"the {x['role']} checkpoint", says,
                     (str(old),) if old else ())
    if isinstance(x, dict) and "teacher_id" in x:  # a server's Info
        dim = int(x.get("dim") or 0)
        return Space(x["teacher_id"], dim, what or "the server",
                     f"searches an index embedded by teacher {x['teacher_id']}")
    raise TypeError(f"no embedding space in {type(x).__name__}")


def check_pairing(query: Any, database: Any, *, query_name: str | None = None,
                  database_name: str | None = None) -> None:
    """The one pairing contract: raise `PairingError` unless the query side (a student, or any model) and the
    database side (an index, a teacher, a server, another model) embed into one space — the same teacher id and
    the same dimension. Every stage that pairs two artifacts calls this; the message names both ids.

    A dimension of 0 (a server that did not say) is not compared.

    Compatibility (`training.compat`): a query side whose teacher was trained compatible with the database's teacher
    (its manifest's `extra.compatible_with` lists that id) pairs with it too; whether its figures are good enough is
    the quality gate's to measure (`asymsearch student check`)."""
    q, d = space_of(query, query_name), space_of(database, database_name)
    if q.teacher_id != d.teacher_id and d.teacher_id in q.compatible_with:
        if q.dim and d.dim and q.dim != d.dim:
            raise PairingError(f"{q.what} embeds into {q.dim} dimensions but {d.what} into {d.dim} (teacher "
                               f"{q.teacher_id} was trained compatible with teacher {d.teacher_id})")
        return
    if q.teacher_id != d.teacher_id:
        raise PairingError(
            f"{q.what} {q.says}, but {d.what} {d.says}: their embeddings are not comparable; use a student "
            f"trained against teacher {d.teacher_id}, or rebuild the index with teacher {q.teacher_id}")
    if q.dim and d.dim and q.dim != d.dim:
        raise PairingError(f"{q.what} embeds into {q.dim} dimensions but {d.what} into {d.dim} (teacher "
                           f"{q.teacher_id} both)")


def require_teacher(model: Any, what: str | None = None) -> None:
    """Raise `PairingError` unless `model` (a manifest, an embedder or a checkpoint dict) is a teacher: a
    database is always embedded by its teacher."""
    manifest = getattr(model, "manifest", model)
    role = manifest["role"] if isinstance(manifest, dict) else manifest.role
    if role != "teacher":
        what = what or str(getattr(model, "path", None) or "the model")
        raise PairingError(f"{what} is a {role}, not a teacher: the database must be embedded by a teacher "
                           f"(its manifest role must be 'teacher')")


def read_json(path: str | os.PathLike, what: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ManifestError(f"{what} not found: {path}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ManifestError(f"cannot read {what} {path}: {e}") from None


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON through a temporary file and a rename, so a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
