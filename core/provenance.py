"""Where a figure came from: the commit, the exact command line, the machine and the date.

Every results JSON the project writes (benchmarks, experiments, evaluations saved with `--json`) carries
`provenance()` under the key "provenance", so a figure in the docs can be traced back to the code and the command
that produced it. Standard library only (the serving side imports this too); nothing here may fail a run: a
field that cannot be read is recorded as None.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

# The packages whose versions decide the figures; recorded when installed.
PACKAGES = ("asymsearch", "torch", "torchvision", "onnxruntime", "faiss-cpu", "numpy", "pillow", "grpcio")


def _git(args: Sequence[str], cwd: Path) -> str | None:
    try:
        r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def git_state(cwd: str | os.PathLike | None = None) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout the code runs from (or `cwd`); (None, None) outside a git checkout."""
    where = Path(cwd) if cwd is not None else Path(__file__).resolve().parent
    commit = _git(["rev-parse", "HEAD"], where)
    if commit is None and cwd is None:  # an installed wheel: try the working directory instead
        where = Path.cwd()
        commit = _git(["rev-parse", "HEAD"], where)
    if commit is None:
        return None, None
    status = _git(["status", "--porcelain", "--untracked-files=no"], where)
    return commit, (bool(status) if status is not None else None)


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _ram_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _gpus() -> list[str]:
    """GPU names from nvidia-smi when it is there; torch is not imported (the serving side has none)."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in r.stdout.splitlines() if line.strip()] if r.returncode == 0 else []


def machine() -> dict[str, Any]:
    """Cores (all, and those this process may use), CPU model, RAM, GPUs, OS and host name."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    return {"cores": os.cpu_count(), "usable_cores": usable, "cpu": _cpu_model(), "ram_gb": _ram_gb(),
            "gpu": _gpus(), "os": platform.platform(), "host": platform.node()}


def package_versions(names: Sequence[str] = PACKAGES) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command as a shell would take it back; `asymsearch ...` when run through the console script."""
    argv = list(sys.argv if argv is None else argv)
    if argv and Path(argv[0]).name in ("asymsearch", "__main__.py"):
        argv[0] = "asymsearch" if Path(argv[0]).name == "asymsearch" else f"{sys.executable} -m asymsearch"
    return shlex.join(argv)


def provenance(argv: Sequence[str] | None = None, *, cwd: str | os.PathLike | None = None) -> dict[str, Any]:
    """What every results JSON records: commit (and whether the tree had uncommitted changes), the exact command
    line, the machine, the date (UTC, ISO 8601), the Python and the versions of the packages that decide figures."""
    commit, dirty = git_state(cwd)
    return {
        "commit": commit,
        "dirty": dirty,
        "command": command_line(argv),
        "machine": machine(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "packages": package_versions(),
    }
