"""Versioned index roots: every change is a new complete folder, published by an atomic switch of `CURRENT`.

Layout of a ROOT::

    ROOT/CURRENT                  text file: the name of the live version, e.g. "v000003"
    ROOT/versions/v000003/        a complete index folder (manifest.json, index.faiss, meta.sqlite, skipped.tsv)
    ROOT/versions/v000002/        older versions, kept up to `keep`
    ROOT/.lock                    held (flock) by the one writer at a time

A plain index folder (manifest.json directly inside, no CURRENT) is still an index; `resolve_index_folder` accepts
both. A reader resolves CURRENT once and opens that version folder; it never sees a half-written version because
a version folder is complete before CURRENT names it, and CURRENT is replaced by `os.replace` of a fully written,
fsynced temporary file. A writer killed at any instant leaves CURRENT naming the previous version.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Iterator

from asymsearch.core.errors import UserError

CURRENT_FILE = "CURRENT"
VERSIONS_DIR = "versions"
LOCK_FILE = ".lock"
VERSION_RE = re.compile(r"^v(\d{6,})$")
INDEX_FILES = ("manifest.json", "index.faiss", "meta.sqlite")
CRASH_ENV = "ASYMSEARCH_CRASH_AT"  # fault injection for the kill -9 tests: the name of a crash point


def crash_point(name: str) -> None:
    """Kill this process with SIGKILL (no cleanup, like a power cut) when `$ASYMSEARCH_CRASH_AT` names this point.

    The kill -9 tests set the variable in a subprocess to stop a build, an add or a publish at an exact step.
    """
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def version_name(number: int) -> str:
    return f"v{number:06d}"


def version_number(name: str) -> int | None:
    m = VERSION_RE.match(name)
    return int(m.group(1)) if m else None


def is_versioned_root(path: str | os.PathLike) -> bool:
    return (Path(path) / CURRENT_FILE).is_file()


def read_current(root: str | os.PathLike) -> str:
    """The version name CURRENT holds; `UserError` when it is missing or names no valid version folder."""
    root = Path(root)
    try:
        name = (root / CURRENT_FILE).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise UserError(f"{root} is not a versioned index root (no {CURRENT_FILE} file)") from None
    if version_number(name) is None:
        raise UserError(f"{root / CURRENT_FILE} holds {name!r}, not a version name like 'v000001'")
    if not (root / VERSIONS_DIR / name).is_dir():
        raise UserError(f"{root / CURRENT_FILE} names version {name} but {root / VERSIONS_DIR / name} is missing")
    return name


def resolve_index_folder(path: str | os.PathLike) -> tuple[Path, str | None]:
    """(folder to open, version name) for a versioned root (its CURRENT version), (folder, None) for a plain folder.

    `UserError` when `path` is neither: missing, or a folder with no CURRENT and no manifest.json.
    """
    path = Path(path).resolve()
    if not path.is_dir():
        raise UserError(f"index folder not found: {path}")
    if (path / CURRENT_FILE).exists():
        name = read_current(path)
        return path / VERSIONS_DIR / name, name
    return path, None


def list_versions(root: str | os.PathLike) -> list[str]:
    """Version folder names under ROOT/versions, oldest first (by number)."""
    folder = Path(root) / VERSIONS_DIR
    if not folder.is_dir():
        return []
    names = [p.name for p in folder.iterdir() if p.is_dir() and version_number(p.name) is not None]
    return sorted(names, key=version_number)


@contextlib.contextmanager
def writer_lock(root: str | os.PathLike) -> Iterator[None]:
    """Exclusive lock for the one process that changes ROOT; a second writer gets a clear error, not a wait.

    The kernel drops an flock when its holder dies, so a writer killed with SIGKILL never leaves ROOT locked.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another process is changing the index {root}; wait for it to finish") from None
        yield
    finally:
        os.close(fd)


def staging_dir(root: str | os.PathLike) -> Path:
    """A fresh hidden folder inside ROOT/versions in which the next version is written before it is published."""
    folder = Path(root) / VERSIONS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    while True:
        path = folder / f".staging-{os.getpid()}-{n}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            n += 1


def clean_stale(root: str | os.PathLike) -> list[str]:
    """Remove what a killed writer left: staging folders and versions newer than CURRENT (published folder whose
    CURRENT switch never happened). Call only while holding `writer_lock`. Returns the names removed."""
    root = Path(root)
    folder = root / VERSIONS_DIR
    removed = []
    if not folder.is_dir():
        return removed
    current = version_number(read_current(root)) if is_versioned_root(root) else -1
    for p in folder.iterdir():
        n = version_number(p.name)
        if p.name.startswith(".staging-") or (n is not None and n > current):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    for tmp in root.glob(f".{CURRENT_FILE}.tmp*"):
        tmp.unlink(missing_ok=True)
    if current >= 0:  # a plain folder turned into a root, killed before its plain files were removed
        for name in INDEX_FILES + ("skipped.tsv", "config.yaml"):
            (root / name).unlink(missing_ok=True)
    return removed


def publish(root: str | os.PathLike, staged: str | os.PathLike, *, keep: int | None = None) -> str:
    """Make the complete index folder `staged` (inside ROOT/versions) the live version of ROOT; return its name.

    Steps, each safe to be killed after: fsync the staged files; rename it to the next version name; write
    CURRENT.tmp, fsync, `os.replace` onto CURRENT, fsync the folder; prune old versions beyond `keep` (the live
    one is never pruned). Call while holding `writer_lock`.
    """
    root, staged = Path(root), Path(staged)
    for name in INDEX_FILES:
        if not (staged / name).is_file():
            raise UserError(f"cannot publish {staged}: {name} is missing")
    for f in staged.iterdir():
        _fsync_file(f)
    _fsync_dir(staged)
    existing = [version_number(n) for n in list_versions(root)]
    name = version_name(max(existing, default=0) + 1)
    target = root / VERSIONS_DIR / name
    os.rename(staged, target)
    _fsync_dir(target.parent)
    crash_point("publish:before-current")
    write_current(root, name)
    crash_point("publish:after-current")
    if keep is not None:
        prune(root, keep)
    return name


def write_current(root: Path, name: str) -> None:
    tmp = root / f".{CURRENT_FILE}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / CURRENT_FILE)
    _fsync_dir(root)


def prune(root: str | os.PathLike, keep: int) -> list[str]:
    """Delete all but the `keep` newest versions up to CURRENT (CURRENT always stays). Returns the names removed."""
    if keep < 1:
        raise UserError(f"--keep must be at least 1 (the live version), not {keep}")
    root = Path(root)
    current = version_number(read_current(root))
    older = [n for n in list_versions(root) if version_number(n) <= current]
    doomed = older[:-keep]
    for name in doomed:
        shutil.rmtree(root / VERSIONS_DIR / name, ignore_errors=True)
    return doomed


def _fsync_file(path: Path) -> None:
    if path.is_file():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
