"""What the Admin service runs, and the rules that confine it.

Index updates are the index stage's own (`asymsearch.index.update`): they publish a new version of the index root,
which the server then reloads like any new CURRENT. Adding embeds the new images with the teacher, so the server
must be given the teacher's ONNX model (`asymsearch serve --admin --teacher teacher.onnx`); removing needs none.

Confinement (docs/security.md):

- Images reach the server over the wire (`UploadImages`, `asymsearch index push`): each is checked (a plain file
  name with an image suffix, a label that is a plain folder name, metadata keys that are not reserved), written
  below `ROOT/uploads/<upload>/<label>/` of the served index root, and added from there. No client-supplied path
  is opened. A Milvus index has no root folder (`uploads_folder`): for a Milvus Lite file the uploads go beside
  it (`FILE.db.uploads/NAME/`), for a Milvus cluster below the first `--admin-root` (`uploads/NAME/`; without
  one UploadImages is refused), and the collection's rows name those files.
- A path-based `AddImages` reads only folders under the server's `--admin-root` folders, after resolving every
  symlink (the folder's and each file's); without `--admin-root` it is off.
- `Reload` serves only versions of the served index root.
- `LoadStudent` loads only student models (and their manifests) under the `--admin-root` folders; off without one.

Every refusal names the rule; none echoes a path's existence outside the admin roots or any file's content.
"""
from __future__ import annotations

import csv
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Sequence

from asymsearch.core.data import IMAGE_SUFFIXES, list_images_flat
from asymsearch.core.errors import UserError

UPLOADS_DIR = "uploads"  # below the index root
MAX_UPLOAD_IMAGES = 100_000  # images in one UploadImages call
RESERVED_COLUMNS = ("id", "path", "label")
_VERSION_NAME = re.compile(r"^v\d{6,}$")


class PermissionDenied(Exception):
    """An Admin request outside what this server allows (PERMISSION_DENIED on the wire)."""


class TeacherUpdater:
    """`IndexUpdater` on top of `asymsearch.index.update`; `keep` old versions are kept (None: all)."""

    def __init__(self, teacher: str | os.PathLike | None, *, keep: int | None = None) -> None:
        self.teacher = Path(teacher) if teacher else None
        self.keep = keep

    def add(self, root: Path, folder: str, metadata_csv: str | None = None) -> None:
        from asymsearch.index.update import add_images
        if self.teacher is None:
            raise UserError("adding images needs the teacher model: start the server with --teacher T.onnx")
        add_images(root, self.teacher, folder, metadata=metadata_csv or None, keep=self.keep, progress=False)

    def remove(self, root: Path, ids: Sequence[int]) -> None:
        from asymsearch.index.update import remove_ids
        remove_ids(root, ids, keep=self.keep)


# -- path-based adds: only under the admin roots -------------------------------------------------------------------

def _under(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == r or path.is_relative_to(r) for r in roots)


def confined_folder(folder: str, metadata_csv: str | None, admin_roots: Sequence[str]) -> tuple[Path, Path | None]:
    """(folder, csv) resolved, when both lie under an admin root and so does every image file below the folder
    (symlinks followed); `PermissionDenied` naming the rule otherwise. Nothing outside the roots is looked at
    beyond resolving the given path, and the message is the same whether it exists or not."""
    if not admin_roots:
        raise PermissionDenied("path-based AddImages is off on this server (no --admin-root): send the images "
                               "over the wire with `asymsearch index push` or the SDK's push_images")
    roots = [Path(r).resolve() for r in admin_roots]
    out: list[Path | None] = []
    for what, given in (("folder", folder), ("metadata CSV", metadata_csv)):
        if not given:
            out.append(None)
            continue
        path = Path(given)
        if not path.is_absolute():
            raise PermissionDenied(f"AddImages needs an absolute {what} path under an --admin-root folder")
        resolved = path.resolve()
        if not _under(resolved, roots):
            raise PermissionDenied(f"the {what} is not under one of this server's --admin-root folders "
                                   f"(symlinks resolved); AddImages reads nothing else")
        out.append(resolved)
    images = list_images_flat(out[0])  # UserError (no such folder, no images) is fine to tell: it is inside a root
    outside = [i for i in images if not _under(Path(i.path), roots)]
    if outside:
        raise PermissionDenied(f"{len(outside)} image file(s) below the folder are links to files outside the "
                               f"--admin-root folders; AddImages reads nothing else")
    return out[0], out[1]


def confined_student(path: str, admin_roots: Sequence[str]) -> Path:
    """The student ONNX a LoadStudent names, resolved, when it and its manifest (NAME.json) lie under an admin root
    (symlinks followed); `PermissionDenied` naming the rule otherwise, with the same message whether it exists or
    not."""
    if not admin_roots:
        raise PermissionDenied("LoadStudent is off on this server (no --admin-root): it loads students only from "
                               "the --admin-root folders")
    roots = [Path(r).resolve() for r in admin_roots]
    given = Path(path)
    if not given.is_absolute() or given.suffix not in (".onnx", ".ort"):
        raise PermissionDenied("LoadStudent needs an absolute path of a .onnx (or .ort) file under an --admin-root "
                               "folder")
    resolved = given.resolve()
    manifest = resolved.with_suffix(".json").resolve()  # the manifest the loader reads, beside the resolved model
    if not _under(resolved, roots) or not _under(manifest, roots):
        raise PermissionDenied("the student (or its .json manifest) is not under one of this server's --admin-root "
                               "folders (symlinks resolved); LoadStudent reads nothing else")
    if not resolved.is_file():
        raise UserError(f"no student model at {path} (under an --admin-root)")
    return resolved


def confined_version(path: str, root: str | os.PathLike) -> Path:
    """The version folder of the served index root that a Reload names (a version name, or its folder below
    ROOT/versions); `PermissionDenied` for anything else, whether it exists or not. A Milvus index has no version
    folders: `UserError` pointing at `index rollback` (which switches the alias every server follows)."""
    if isinstance(root, str) and root.startswith(("milvus://", "milvus-lite://")):
        raise UserError(f"Reload of one version applies to a folder root; the served index {root} is a Milvus alias: "
                        f"`asymsearch index rollback {root} VERSION` points it at another version collection, and "
                        f"every server following it swaps (Reload without a path reloads what the alias names)")
    versions = (Path(root) / "versions").resolve()
    if _VERSION_NAME.match(path):
        candidate = versions / path
    else:
        candidate = Path(path).resolve() if Path(path).is_absolute() else None
    if candidate is None or candidate.parent != versions:
        raise PermissionDenied("Reload serves only versions of the served index root: give a version name (e.g. "
                               "v000003, see `asymsearch index info ROOT`) or leave the path empty for CURRENT")
    if not candidate.is_dir():
        raise UserError(f"the served index root has no version {candidate.name}")
    return candidate


# -- images over the wire ------------------------------------------------------------------------------------------

def _plain_name(value: str, what: str, n: int) -> str:
    if (not value or value in (".", "..") or len(value) > 255 or any(c in value for c in "/\\\0")
            or value != value.strip() or value.startswith(".")):
        raise UserError(f"upload image {n}: the {what} must be a plain name (no '/', '\\', NUL, no leading '.' "
                        f"or spaces, at most 255 characters)")
    return value


def uploads_folder(source: str | os.PathLike, admin_roots: Sequence[str] = ()) -> Path:
    """Where the uploads of the index `source` are kept: ROOT/uploads for a folder root; for a Milvus Lite file
    FILE.db.uploads/NAME beside it; for a Milvus cluster (no folder of its own) ADMIN_ROOT/uploads/NAME below the
    first --admin-root, `PermissionDenied` without one."""
    text = str(source) if isinstance(source, str) else None
    if text is not None and text.startswith(("milvus://", "milvus-lite://")):
        from asymsearch.index.milvus import parse_location
        loc = parse_location(text)
        if loc.lite:
            return Path(loc.uri).with_name(Path(loc.uri).name + ".uploads") / loc.name
        if not admin_roots:
            raise PermissionDenied("UploadImages on a Milvus cluster keeps the images below the first --admin-root "
                                   "folder (the collection names their paths); this server has none")
        return Path(admin_roots[0]).resolve() / UPLOADS_DIR / loc.name
    return Path(source) / UPLOADS_DIR


class Upload:
    """The images of one UploadImages call, written below ROOT/uploads/<id>/ (`uploads_folder`) as they arrive,
    with a metadata CSV beside them; `discard()` removes them (the add failed), else they stay: the index refers to
    them."""

    def __init__(self, root: str | os.PathLike, max_bytes: int, admin_roots: Sequence[str] = ()) -> None:
        self.id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
        self.folder = uploads_folder(root, admin_roots) / self.id
        self.folder.mkdir(parents=True)
        self.max_bytes = max_bytes
        self.count = 0
        self.bytes = 0
        self._rows: list[dict[str, str]] = []
        self._columns: set[str] = set()
        self._seen: set[tuple[str, str]] = set()

    def add(self, name: str, label: str, data: bytes, metadata: dict[str, str]) -> None:
        n = self.count + 1
        _plain_name(name, "name", n)
        _plain_name(label, "label", n)
        if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
            raise UserError(f"upload image {n}: the name needs an image suffix ({', '.join(sorted(IMAGE_SUFFIXES))})")
        if not data:
            raise UserError(f"upload image {n}: no image bytes")
        if (label, name) in self._seen:
            raise UserError(f"upload image {n}: a second image with the same label and name")
        bad = [k for k in metadata if k in RESERVED_COLUMNS or not k.strip()]
        if bad:
            raise UserError(f"upload image {n}: metadata keys id, path, label and empty ones are reserved")
        if n > MAX_UPLOAD_IMAGES:
            raise UserError(f"an upload holds at most {MAX_UPLOAD_IMAGES} images; send more in another call")
        if self.bytes + len(data) > self.max_bytes:
            raise UserError(f"the upload exceeds {self.max_bytes // 2**20} MiB (--max-upload-mb); send the rest in "
                            f"another call")
        (self.folder / label).mkdir(exist_ok=True)
        (self.folder / label / name).write_bytes(data)
        self._seen.add((label, name))
        self.count, self.bytes = n, self.bytes + len(data)
        if metadata:
            self._columns.update(metadata)
            self._rows.append({"path": f"{label}/{name}", **metadata})

    def metadata_csv(self) -> Path | None:
        """The CSV of the images' metadata (beside the folder, so it is not taken for an image), None without."""
        if not self._rows:
            return None
        path = self.folder.with_name(self.folder.name + ".metadata.csv")
        columns = ["path", *sorted(self._columns)]
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(self._rows)
        return path

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.with_name(self.folder.name + ".metadata.csv").unlink(missing_ok=True)

