"""Versioned index roots: every change is a new complete folder, published by an atomic switch of `CURRENT`.

Layout of a ROOT::

    ROOT/CURRENT                  text file: the name of the live version, e.g. "v000003" (one line, unchanged)
    ROOT/PUBLISHED                every version name ever published, one a line, in publish order (append-only)
    ROOT/versions/v000003/        a complete index folder (manifest.json, index.faiss, meta.sqlite, skipped.tsv)
    ROOT/versions/v000002/        older versions, kept up to `keep`
    .ROOT.work/lock               beside ROOT: held (flock) by the one writer at a time; holds its pid

A plain index folder (manifest.json directly inside, no CURRENT) is still an index; `resolve_index_folder` accepts
both. A reader resolves CURRENT once and opens that version folder; it never sees a half-written version because
a version folder is complete (and fsynced) before CURRENT names it, and CURRENT is replaced by `os.replace` of a
fully written, fsynced temporary file. A writer killed at any instant leaves CURRENT naming a complete version:
the previous one, or the new one once the switch happened.

Published versions are never deleted except by `prune` (older than CURRENT, beyond `keep`), and a version name is
never given twice: the next name is one above every folder and every name in PUBLISHED. A version folder is
written to PUBLISHED before CURRENT names it, so a version newer than CURRENT that PUBLISHED lists (one rolled
back from, by `index rollback` or by hand) is kept; one that it does not list was renamed into place by a writer
killed before publishing it, and `clean_stale` removes it, as it removes the versions of a root that never had a
CURRENT (its first publish was killed: no reader could ever have opened them).

The writer lock lives in the work folder `.<ROOT>.work/` beside ROOT (where builds and adds keep their embedding
shards), so it covers the root, its work and a plain folder that a build replaces. It is taken when a build, an
add, a remove or a rollback starts; a second writer gets a one-line error naming the holder's pid. The kernel
drops an flock when its holder dies; the pid the dead holder wrote stays in the file, so the next writer can say
whose work it found.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

from asymsearch.core.errors import UserError

CURRENT_FILE = "CURRENT"
PUBLISHED_FILE = "PUBLISHED"
VERSIONS_DIR = "versions"
LOCK_FILE = "lock"  # inside the work folder beside ROOT
STAGING_PREFIX = ".staging-"
VERSION_RE = re.compile(r"^v(\d{6,})$")
INDEX_FILES = ("manifest.json", "index.faiss", "meta.sqlite")
CRASH_ENV = "ASYMSEARCH_CRASH_AT"  # fault injection for the kill -9 tests: "POINT" or "POINT@N" (the N-th arrival)
PAUSE_ENV = "ASYMSEARCH_PAUSE_AT"  # the same, but wait there (up to PAUSE_LIMIT_S) until SIGUSR1 or SIGKILL
PAUSE_LIMIT_S = 120.0

log = logging.getLogger("asymsearch.index")


# -- fault injection (tests only; read once, so it costs one comparison per point in production) ----------------

def _parse_hook(value: str | None) -> tuple[str, int] | None:
    if not value:
        return None
    name, _, nth = value.partition("@")
    return name, int(nth) if nth.isdigit() and int(nth) > 0 else 1


_CRASH_AT = _parse_hook(os.environ.get(CRASH_ENV))
_PAUSE_AT = _parse_hook(os.environ.get(PAUSE_ENV))
_arrivals: dict[str, int] = {}


def crash_point(name: str) -> None:
    """A named step of a build, an add, a remove, a publish or a rollback.

    With `$ASYMSEARCH_CRASH_AT=name[@N]` the process kills itself with SIGKILL (no cleanup, like a power cut) the
    N-th time it gets here; with `$ASYMSEARCH_PAUSE_AT=name[@N]` it prints `paused at NAME (pid P)` on stderr and
    waits there until SIGUSR1 (then goes on) or a kill. Both variables are read once, when this module is imported.
    """
    if _CRASH_AT is None and _PAUSE_AT is None:
        return
    _arrivals[name] = count = _arrivals.get(name, 0) + 1
    if _CRASH_AT == (name, count):
        os.kill(os.getpid(), signal.SIGKILL)
    if _PAUSE_AT == (name, count):
        _pause(name)


def _pause(name: str) -> None:
    resumed = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR1, lambda *_: resumed.set())
    print(f"asymsearch: paused at {name} (pid {os.getpid()})", file=sys.stderr, flush=True)
    deadline = time.monotonic() + PAUSE_LIMIT_S
    while not resumed.is_set() and time.monotonic() < deadline:
        time.sleep(0.01)  # short sleeps: the handler runs on the main thread whichever thread got the signal


# -- names ---------------------------------------------------------------------------------------------------

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


def read_published(root: str | os.PathLike) -> list[str]:
    """The names in ROOT/PUBLISHED, in publish order ([] when there is no such file)."""
    try:
        text = (Path(root) / PUBLISHED_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [line.strip() for line in text.splitlines() if version_number(line.strip()) is not None]


def next_version_name(root: str | os.PathLike) -> str:
    """One above every version folder and every name ever published, so that no name is given twice."""
    numbers = [version_number(n) for n in list_versions(root) + read_published(root)]
    return version_name(max(numbers, default=0) + 1)


# -- the writer lock -----------------------------------------------------------------------------------------

def work_root(out: str | os.PathLike) -> Path:
    """The work folder of the index `out`: `.<name>.work` beside it (the lock, embedding shards, scratch)."""
    out = Path(out)
    return out.parent / f".{out.name}.work"


@dataclasses.dataclass
class WriterLock:
    """The held lock: `previous_pid` is the pid a writer that stopped before finishing left in the lock file."""

    path: Path
    work: Path
    previous_pid: int | None

    def left_by(self) -> str:
        """'process 1234' (the interrupted writer) or 'an interrupted writer' when it left no pid."""
        return f"process {self.previous_pid}" if self.previous_pid else "an interrupted writer"


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


@contextlib.contextmanager
def writer_lock(root: str | os.PathLike) -> Iterator[WriterLock]:
    """Exclusive lock for the one process that changes `root` (a versioned root, or the plain folder a build
    writes); a second writer gets a one-line error naming the holder's pid, not a wait.

    The lock file is `.<root>.work/lock`, beside `root`. The kernel drops an flock when its holder dies, so a
    writer killed with SIGKILL never leaves `root` locked; its pid stays in the file (`previous_pid` of the next
    holder). A holder that finishes with nothing left in the work folder removes the lock file and the folder.
    """
    root = Path(root)
    work = work_root(root)
    path = work / LOCK_FILE
    while True:  # the previous holder may remove the file between our open and our flock: then start again
        work.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"another process (pid {holder})" if holder else "another process"
            raise UserError(f"{who} is changing the index {root}; wait for it to finish") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        previous = _read_pid(fd)
        previous = previous if previous != os.getpid() else None
        if previous:
            log.warning("index %s: process %d stopped before finishing (it no longer holds the lock); checking "
                        "what it left", root, previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield WriterLock(path, work, previous)
    finally:
        try:
            if [p.name for p in work.iterdir()] == [LOCK_FILE]:  # nothing left to resume: leave no trace
                path.unlink()  # while still holding it: a writer that opened the old file retries on a new one
                work.rmdir()
        except OSError:
            pass
        os.close(fd)


# -- what a killed writer leaves -----------------------------------------------------------------------------

def staging_dir(root: str | os.PathLike) -> Path:
    """A fresh hidden folder inside ROOT/versions in which the next version is written before it is published.

    Creates ROOT/PUBLISHED first (listing the versions already there, for a root made before it existed), so a
    folder holding `versions/` always says it is a root this code manages."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _ensure_published_file(root)
    folder = root / VERSIONS_DIR
    folder.mkdir(exist_ok=True)
    n = 0
    while True:
        path = folder / f"{STAGING_PREFIX}{os.getpid()}-{n}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            n += 1


def _ensure_published_file(root: Path) -> None:
    """ROOT/PUBLISHED exists; a root without one (made before it existed) gets every version folder listed:
    whether one newer than CURRENT was published cannot be known any more, so all of them are kept."""
    if (root / PUBLISHED_FILE).is_file():
        return
    names = list_versions(root)
    tmp = root / f".{PUBLISHED_FILE}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(f"{n}\n" for n in names))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / PUBLISHED_FILE)
    _fsync_dir(root)


def clean_stale(root: str | os.PathLike, lock: WriterLock | None = None) -> list[str]:
    """Remove what a killed writer left in ROOT, logging one line that names what was removed. Call only while
    holding `writer_lock`. Returns the names removed.

    Removed: staging folders, temporary CURRENT / PUBLISHED files, a version newer than CURRENT that PUBLISHED
    does not list (renamed into place, never published), the plain files of a folder turned into a root. A folder
    with PUBLISHED but no CURRENT never had a live version (a first publish killed before writing CURRENT): its
    version folders and PUBLISHED go, and a root left empty is removed (if PUBLISHED lists several versions,
    CURRENT was deleted by hand: the newest complete one is named again instead). Never removed: a version that
    CURRENT names or that PUBLISHED lists in a root with CURRENT, whatever its number (a rollback, by `index
    rollback` or by hand, leaves newer ones behind). A folder without PUBLISHED and CURRENT (a plain index, or
    anything else) loses only staging folders.
    """
    root = Path(root)
    removed: list[str] = []
    notes: dict[str, str] = {}
    if not root.is_dir():
        return removed
    folder = root / VERSIONS_DIR
    for tmp in list(root.glob(f".{CURRENT_FILE}.tmp*")) + list(root.glob(f".{PUBLISHED_FILE}.tmp*")):
        tmp.unlink(missing_ok=True)
        removed.append(tmp.name)
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(STAGING_PREFIX):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
    ours = (root / PUBLISHED_FILE).is_file()
    if not is_versioned_root(root) and ours:
        _finish_first_publish(root, lock)
    if is_versioned_root(root):
        _ensure_published_file(root)
        current = read_current(root)
        published = set(read_published(root))
        if current not in published:  # a version folder put in and named by hand: it is published now
            _append_published(root, current)
            published.add(current)
        for name in list_versions(root):
            if version_number(name) > version_number(current) and name not in published:
                shutil.rmtree(folder / name, ignore_errors=True)
                removed.append(name)
                notes[name] = "never published"
        for name in INDEX_FILES + ("skipped.tsv", "config.yaml", "index.ivfdata"):
            if (root / name).is_file():  # a plain folder turned into a root, killed before its files were removed
                (root / name).unlink()
                removed.append(name)
    elif ours:  # no CURRENT was ever written: no version here was ever published
        for name in list_versions(root):
            shutil.rmtree(folder / name, ignore_errors=True)
            removed.append(name)
            notes[name] = "never published"
        (root / PUBLISHED_FILE).unlink()
        removed.append(PUBLISHED_FILE)
    if not is_versioned_root(root):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        if ours and not any(root.iterdir()):  # a root this code began and never published
            root.rmdir()
            removed.append(root.name)
            notes[root.name] = "empty, never published"
    if removed:
        log.warning("index %s: removed what %s left: %s", root, lock.left_by() if lock else "an interrupted writer",
                    ", ".join(f"{n} ({notes[n]})" if n in notes else n for n in removed))
    return removed


def _finish_first_publish(root: Path, lock: WriterLock | None) -> None:
    """A root without CURRENT whose PUBLISHED lists versions. Listing one, it is a first publish killed before
    CURRENT was written: nobody could ever read it, and the caller removes it (so the same build or add again
    starts from the start). Listing more, CURRENT existed and has been deleted since: the newest complete listed
    version is made live again rather than lose them all."""
    listed = read_published(root)
    complete = [n for n in listed if all((root / VERSIONS_DIR / n / f).is_file() for f in INDEX_FILES)]
    if len(listed) > 1 and complete:
        write_current(root, complete[-1])
        log.warning("index %s: %s was missing; it names %s again, the newest version listed in %s", root,
                    CURRENT_FILE, complete[-1], PUBLISHED_FILE)


# -- publishing ----------------------------------------------------------------------------------------------

def publish(root: str | os.PathLike, staged: str | os.PathLike, *, keep: int | None = None) -> str:
    """Make the complete index folder `staged` (inside ROOT/versions) the live version of ROOT; return its name.

    Steps, each safe to be killed after: fsync the staged files and folder; rename it to the next version name
    and fsync versions/; append the name to PUBLISHED (fsynced); write CURRENT.tmp, fsync, `os.replace` onto
    CURRENT, fsync ROOT; prune old versions beyond `keep` (the live one is never pruned). Call while holding
    `writer_lock`.
    """
    root, staged = Path(root), Path(staged)
    for name in INDEX_FILES:
        if not (staged / name).is_file():
            raise UserError(f"cannot publish {staged}: {name} is missing")
    fsync_tree(staged)
    _ensure_published_file(root)
    name = next_version_name(root)
    target = root / VERSIONS_DIR / name
    os.rename(staged, target)
    _fsync_dir(target.parent)
    crash_point("publish:after-rename")
    _append_published(root, name)
    crash_point("publish:before-current")
    write_current(root, name)
    crash_point("publish:after-current")
    if keep is not None:
        prune(root, keep)
    return name


def _append_published(root: Path, name: str) -> None:
    fd = os.open(root / PUBLISHED_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{name}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def write_current(root: Path, name: str) -> None:
    """Point CURRENT at `name` atomically: a fsynced temporary file replaces it, then ROOT is fsynced."""
    tmp = root / f".{CURRENT_FILE}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    crash_point("current:before-replace")
    os.replace(tmp, root / CURRENT_FILE)
    _fsync_dir(root)


def prune(root: str | os.PathLike, keep: int) -> list[str]:
    """Delete all but the `keep` newest versions up to CURRENT (CURRENT always stays; versions newer than CURRENT,
    left by a rollback, are never pruned). Returns the names removed."""
    if keep < 1:
        raise UserError(f"--keep must be at least 1 (the live version), not {keep}")
    root = Path(root)
    current = version_number(read_current(root))
    older = [n for n in list_versions(root) if version_number(n) <= current]
    doomed = older[:-keep]
    for name in doomed:
        shutil.rmtree(root / VERSIONS_DIR / name, ignore_errors=True)
    return doomed


def fsync_tree(folder: Path) -> None:
    """fsync every file directly inside `folder`, then the folder itself (an index folder has no subfolders)."""
    for f in folder.iterdir():
        _fsync_file(f)
    _fsync_dir(folder)


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
