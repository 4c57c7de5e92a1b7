"""An index no crash can wedge, in the style of Qdrant's crasher: real `kill -9` of real `asymsearch index ...`
subprocesses at random moments (a seeded choice among the named fault-injection points of `ASYMSEARCH_CRASH_AT`,
`point@N` for the N-th arrival), each followed by a consistency check and a rerun that must complete; plus the
exact failure of issue 22 (a killed add that wedged every later add), two concurrent builders of one output, and
the atomicity and durability of a plain `index build --overwrite`.

The crash test prints its seed; `ASYMSEARCH_CRASH_SEED=N` replays a run, `ASYMSEARCH_CRASH_MOMENTS` changes how
many kills it makes (30 by default).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import faiss
import pytest

from asymsearch.cli.main import main
from asymsearch.core.data import list_image_folder, list_images_flat
from asymsearch.core.manifest import IndexManifest
from asymsearch.core.synthetic import make_synthetic_dataset
from asymsearch.index import build as build_module
from asymsearch.index import versions
from asymsearch.index.build import build_index
from asymsearch.index.store import SearchIndex

BATCH, SHARD = "2", "6"  # small shards: several kill moments inside every embedding
ENV_KEYS = (versions.CRASH_ENV, versions.PAUSE_ENV)


def run(args: list[str], *, crash: str | None = None) -> tuple[int, str, str, int]:
    """`python -m asymsearch.cli.main ARGS` as a real subprocess: (returncode, stdout, stderr, pid)."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    if crash:
        env[versions.CRASH_ENV] = crash
    p = subprocess.Popen([sys.executable, "-m", "asymsearch.cli.main", *args], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=120)
    return p.returncode, out, err, p.pid


def run_here(args: list[str]) -> tuple[int, str, str]:
    """The same command through the CLI's entry point in this process (no interpreter start-up): (returncode,
    stdout, the lines the index code logged, which a subprocess prints on stderr)."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("asymsearch.index")
    logger.addHandler(handler)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            rc = main(args)
    finally:
        logger.removeHandler(handler)
    return rc, out.getvalue(), "\n".join(lines)


def observe(path: Path) -> tuple[str | None, dict[int, str], IndexManifest]:
    """(live version, {id: path}, manifest) after checking what a reader relies on: `index info` works, faiss
    holds as many vectors as the metadata has rows and the manifest says, with the same ids, no path twice."""
    folder, version = versions.resolve_index_folder(path)
    manifest = IndexManifest.load(folder / "manifest.json")
    index = faiss.read_index(str(folder / "index.faiss"))
    faiss_ids = sorted(faiss.vector_to_array(index.id_map).tolist())
    con = sqlite3.connect(f"file:{folder / 'meta.sqlite'}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT id, path FROM items").fetchall()
    finally:
        con.close()
    assert index.ntotal == len(rows) == manifest.count, (index.ntotal, len(rows), manifest.count)
    assert faiss_ids == sorted(i for i, _ in rows)
    assert len({p for _, p in rows}) == len(rows), "a path is in the index twice"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["index", "info", "--index", str(path)]) == 0
    info = json.loads(buf.getvalue())
    assert (info["count"], info["version"]) == (manifest.count, version)
    with SearchIndex.open(path) as opened:
        assert opened.count == manifest.count
    return version, dict(rows), manifest


def no_leftovers(path: Path) -> None:
    assert not versions.work_root(path).exists(), sorted(p.name for p in versions.work_root(path).iterdir())
    assert not list(path.parent.glob(f".{path.name}.tmp-*")) and not list(path.parent.glob(f".{path.name}.old-*"))
    if versions.is_versioned_root(path):
        assert not list((path / "versions").glob(".staging-*")) and not list(path.glob(".CURRENT.tmp*"))
        numbers = [versions.version_number(n) for n in versions.read_published(path)]
        assert numbers == sorted(set(numbers)), f"a version name was given twice: {numbers}"
        assert set(versions.list_versions(path)) <= set(versions.read_published(path))


@pytest.fixture(scope="module")
def add_folders(tmp_path_factory) -> list[Path]:
    base = tmp_path_factory.mktemp("adds")
    return [make_synthetic_dataset(base / f"batch{i:02d}", num_classes=1, per_class=3, size=48, seed=100 + i)
            for i in range(14)]


class Crasher:
    """The random operations on a versioned root R and a plain folder P, with what each must leave."""

    def __init__(self, rng: random.Random, tmp: Path, teacher: Path, images: Path, add_folders: list[Path]):
        self.rng, self.teacher, self.images, self.add_folders = rng, teacher, images, add_folders
        self.root, self.plain = tmp / "root", tmp / "plain"
        self.class_sets = ["class_00,class_01,class_02", "class_00,class_01,class_02,class_03", "class_04,class_05"]
        self.states: dict[str, dict[int, str]] = {}  # every version ever live -> its content (names are not reused)

    def listing(self, classes: str) -> dict[int, str]:
        return {i: item.path for i, item in enumerate(list_image_folder(self.images, classes.split(",")))}

    def shards(self, classes: str) -> int:
        return math.ceil(len(self.listing(classes)) / int(SHARD))

    def build_args(self, out: Path, classes: str, *extra: str) -> list[str]:
        return ["index", "build", "--teacher", str(self.teacher), "--images", str(self.images), "--out", str(out),
                "--classes", classes, "--batch-size", BATCH, "--shard-size", SHARD, "--overwrite", *extra]

    def choose(self, live: dict[int, str], manifest: IndexManifest):
        """(target, args, crash points [(name, arrivals)], content expected once the command has run)."""
        publish = ["publish:after-rename", "publish:before-current", "current:before-replace", "publish:after-current"]
        keep = self.rng.choice([[], [], ["--keep", "3"]])
        while True:
            op = self.rng.choices(["add", "remove", "build", "plain", "rollback"], [3, 2, 2, 1.5, 1.5])[0]
            if op == "add":
                free = [f for f in self.add_folders
                        if not {i.path for i in list_images_flat(f)} & set(live.values())]
                if not free:
                    continue
                folder = self.rng.choice(free)
                paths = [i.path for i in list_images_flat(folder)]
                first = int(manifest.build["next_id"])
                after = {**live, **{first + n: p for n, p in enumerate(paths)}}
                args = ["index", "add", "--index", str(self.root), "--teacher", str(self.teacher), "--images",
                        str(folder), "--batch-size", BATCH, *keep]
                points = ["add:locked", "embed:after-shard", "add:before-publish", *publish, "add:after-publish"]
                return self.root, op, args, [(p, 1) for p in points], after
            if op == "remove" and len(live) > 6:
                ids = self.rng.sample(sorted(live), self.rng.choice([1, 2]))
                after = {i: p for i, p in live.items() if i not in ids}
                args = ["index", "remove", "--index", str(self.root), "--ids", ",".join(map(str, ids)), *keep]
                points = ["remove:locked", "remove:before-publish", *publish]
                return self.root, op, args, [(p, 1) for p in points], after
            if op in ("build", "plain"):
                classes = self.rng.choice(self.class_sets)
                resume = self.rng.choice([[], ["--resume"]])
                target = self.root if op == "build" else self.plain
                args = self.build_args(target, classes, *resume, *(keep if op == "build" else []))
                embed = [("embed:after-shard", n) for n in range(1, self.shards(classes) + 1)]
                tail = [*publish] if op == "build" else ["build:after-swap"]
                points = [("build:locked", 1), *embed, ("build:before-publish", 1), *[(p, 1) for p in tail],
                          ("build:done", 1)]
                return target, op, args, points, self.listing(classes)
            if op == "rollback":
                current = versions.read_current(self.root)
                targets = [v for v in versions.list_versions(self.root) if v in self.states and v != current]
                if targets:
                    version = self.rng.choice(targets)
                    args = ["index", "rollback", str(self.root), version]
                    points = [("rollback:locked", 1), ("current:before-replace", 1)]
                    return self.root, op, args, points, self.states[version]

    def record(self, version: str | None, content: dict[int, str]) -> None:
        if version is None:
            return
        if version in self.states:
            assert self.states[version] == content, f"version name {version} was reused for other content"
        self.states[version] = content


def test_thirty_random_kills_never_wedge_the_index(tmp_path, tiny_models, image_folder, add_folders):
    seed = int(os.environ.get("ASYMSEARCH_CRASH_SEED") or random.SystemRandom().randrange(2 ** 31))
    moments = int(os.environ.get("ASYMSEARCH_CRASH_MOMENTS") or 30)
    print(f"crash test seed {seed} (replay: ASYMSEARCH_CRASH_SEED={seed})")
    rng = random.Random(seed)
    crasher = Crasher(rng, tmp_path, tiny_models["teacher"], image_folder, add_folders)
    build_index(tiny_models["teacher"], image_folder, crasher.root, classes=crasher.class_sets[0], versioned=True,
                batch_size=int(BATCH), shard_size=int(SHARD), progress=False)
    build_index(tiny_models["teacher"], image_folder, crasher.plain, classes=crasher.class_sets[2],
                batch_size=int(BATCH), shard_size=int(SHARD), progress=False)
    version, content, _ = observe(crasher.root)
    crasher.record(version, content)
    journal = []
    for step in range(moments):
        live_version, live, manifest = observe(crasher.root)
        target, op, args, points, after = crasher.choose(live, manifest)
        before = observe(target)[1]
        name, arrivals = rng.choice(points)
        point = f"{name}@{rng.randint(1, arrivals)}"
        journal.append(f"{step}: {op} killed at {point}: {' '.join(args[1:3])}")
        where = f"seed {seed}, " + "; ".join(journal)
        on_disk = set(versions.list_versions(crasher.root))

        rc, _, err, pid = run(args, crash=point)
        assert rc == -signal.SIGKILL, f"{where}: not killed at {point} (exit {rc}): {err[-2000:]}"
        version, content, _ = observe(target)
        assert content in (before, after), f"{where}: after the kill the index is neither the old nor the new one"

        rc, out, err = run_here(args)  # the kill was a real process; the rerun saves an interpreter start-up
        assert rc == 0, f"{where}: the rerun failed: {err[-2000:]}"
        assert f"process {pid} stopped before finishing" in err, f"{where}: the rerun did not name the killed " \
                                                                 f"process: {err[-2000:]}"
        version, content, _ = observe(target)
        assert content == after, f"{where}: the rerun did not finish the job"
        if target == crasher.root:
            crasher.record(version, content)
            current = versions.version_number(version)
            gone = on_disk - set(versions.list_versions(crasher.root))
            # only --keep prunes, and only versions older than CURRENT: never one a rollback left newer
            assert all("--keep" in args and versions.version_number(v) < current for v in gone), f"{where}: {gone}"
        no_leftovers(target)
    print("\n".join(journal))


@pytest.mark.parametrize("versioned, crash", [(True, "publish:before-current"), (True, "publish:after-current"),
                                               (False, "build:before-publish"), (False, "build:after-swap")])
def test_a_killed_first_build_reruns_to_the_index(tmp_path, tiny_models, image_folder, versioned, crash):
    """A new output: killed before its first CURRENT the root is undone (no reader could open it) and built again;
    killed after the name points at it, the same command again (no --overwrite) has nothing to build."""
    out = tmp_path / "index"
    args = ["index", "build", "--teacher", str(tiny_models["teacher"]), "--images", str(image_folder), "--out",
            str(out), "--classes", "class_00,class_01", "--batch-size", "4", "--shard-size", "8"]
    args += ["--versioned"] if versioned else []
    rc, _, err, pid = run(args, crash=crash)
    assert rc == -signal.SIGKILL, err
    rc, stdout, err = run_here(args)
    assert rc == 0 and f"process {pid} stopped before finishing" in err, err
    published = crash in ("publish:after-current", "build:after-swap")
    assert ("nothing to build: it already holds this build" in err) == published
    assert "20 images, Flat" in stdout
    version, content, _ = observe(out)
    assert content == {i: item.path for i, item in enumerate(list_image_folder(image_folder,
                                                                                ["class_00", "class_01"]))}
    assert version == ("v000001" if versioned else None)
    if versioned:
        assert versions.list_versions(out) == versions.read_published(out) == ["v000001"]
    no_leftovers(out)


def test_a_killed_add_that_had_published_no_longer_wedges_later_adds(tmp_path, tiny_models, image_folder,
                                                                     add_folders):
    """Issue 22: killed at publish:after-current, the rerun of `index add` exited 2 ("already in the index") and left
    its work folder, so every later add of any folder was refused."""
    root = tmp_path / "root"
    build_index(tiny_models["teacher"], image_folder, root, classes="class_00,class_01", versioned=True,
                progress=False)
    add = ["index", "add", "--index", str(root), "--teacher", str(tiny_models["teacher"]), "--images"]
    rc, _, err, pid = run(add + [str(add_folders[0])], crash="publish:after-current")
    assert rc == -signal.SIGKILL, err
    assert versions.read_current(root) == "v000002" and (versions.work_root(root) / "add").is_dir()
    rc, out, err, _ = run(add + [str(add_folders[0])])
    assert rc == 0, err
    assert f"process {pid} stopped before finishing" in err
    assert f"nothing to add: the 3 images of {add_folders[0]} are already published in v000002" in err
    assert "nothing to add" in out and not versions.work_root(root).exists()
    rc, out, err, _ = run(add + [str(add_folders[1])])
    assert rc == 0, err
    assert versions.read_current(root) == "v000003" and "added 3 images (ids 23..25), 26 in all" in out

    # a stale add of other images is discarded, saying whose it was, and the new add goes through
    rc, _, err, pid = run(add + [str(add_folders[2])], crash="embed:after-shard")
    assert rc == -signal.SIGKILL, err
    rc, out, err, _ = run(add + [str(add_folders[3])])
    assert rc == 0, err
    assert f"discarded the unfinished add that process {pid} left (1 embedding shard(s)): it was adding other " \
           f"images ({add_folders[2]})" in err
    assert observe(root)[2].count == 29 and not versions.work_root(root).exists()


def wait_until_paused(p: subprocess.Popen) -> None:
    for line in p.stderr:
        if "paused at" in line:
            assert f"(pid {p.pid})" in line
            return
    raise AssertionError(f"the builder exited ({p.wait()}) without pausing")


def test_a_second_builder_is_refused_and_never_touches_the_first_ones_work(tmp_path, tiny_models, image_folder):
    out = tmp_path / "index"
    args = ["index", "build", "--teacher", str(tiny_models["teacher"]), "--images", str(image_folder),
            "--out", str(out), "--batch-size", "4", "--shard-size", "16"]
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    env.update(OMP_NUM_THREADS="1", **{versions.PAUSE_ENV: "embed:after-shard@2"})
    cmd = [sys.executable, "-m", "asymsearch.cli.main", *args]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_paused(first)  # two shards committed, three to go, the lock held
        work = build_module.work_dir(out)
        shards = {p.name: p.read_bytes() for p in work.iterdir()}
        assert sorted(n for n in shards if n.startswith("shard-")) == [
            "shard-000000.json", "shard-000000.npy", "shard-000001.json", "shard-000001.npy"]
        for second in (args, args + ["--resume"], args + ["--overwrite", "--versioned"]):
            rc, _, err, _ = run(second)
            assert rc == 2 and err.strip().splitlines() == [
                f"asymsearch: error: another process (pid {first.pid}) is changing the index {out}; wait for it to "
                f"finish"], err
        assert {p.name: p.read_bytes() for p in work.iterdir()} == shards  # nothing of the first one's touched
        first.send_signal(signal.SIGUSR1)  # go on
        _, err = first.communicate(timeout=120)
        assert first.returncode == 0, err
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    whole = tmp_path / "whole"
    build_index(tiny_models["teacher"], image_folder, whole, batch_size=4, shard_size=16, progress=False)
    assert (out / "index.faiss").read_bytes() == (whole / "index.faiss").read_bytes()
    assert not versions.work_root(out).exists()

    # the same builder killed while paused: its lock is free, and the next build names it and discards its shards
    env[versions.PAUSE_ENV] = "embed:after-shard@1"
    killed = subprocess.Popen(cmd + ["--overwrite"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        wait_until_paused(killed)
    finally:
        killed.kill()
        killed.communicate()
    rc, _, err, _ = run(args + ["--overwrite"])
    assert rc == 0, err
    assert f"process {killed.pid} stopped before finishing" in err
    assert f"discarded 1 embedding shard(s) that process {killed.pid} left" in err
    assert (out / "index.faiss").read_bytes() == (whole / "index.faiss").read_bytes()


AUDIT_SCRIPT = textwrap.dedent('''
    import os, sys
    from pathlib import Path
    from asymsearch.index.build import build_index
    teacher, images, out = sys.argv[1:4]
    out = Path(out)
    FILES = ("manifest.json", "index.faiss", "meta.sqlite")
    state = {"active": False, "checks": 0, "broken": []}

    def check(event, args):  # before every audited operation (open, rename, rmtree, ctypes calls, ...)
        if state["active"]:
            state["checks"] += 1
            if not all((out / f).is_file() for f in FILES):
                state["broken"].append(event)

    sys.addaudithook(check)
    build_index(teacher, images, out, classes="class_00", progress=False)
    state["active"] = True
    for factory in ("HNSW8", "Flat", "HNSW8"):
        build_index(teacher, images, out, classes="class_00,class_01", factory=factory, overwrite=True,
                    progress=False)
    state["active"] = False
    good = dict(state)
    # the checker sees the window of the old way (move the old folder aside, then the new one in)
    state.update(active=True, checks=0, broken=[])
    build_index(teacher, images, out.with_name("next"), classes="class_00", progress=False)
    os.rename(out, out.with_name("aside"))
    os.rename(out.with_name("next"), out)
    state["active"] = False
    print(good["checks"], len(good["broken"]), len(state["broken"]))
''')


def test_overwrite_swaps_atomically_and_the_check_sees_a_two_rename_window(tmp_path, tiny_models, image_folder):
    out = tmp_path / "index"
    r = subprocess.run([sys.executable, "-c", AUDIT_SCRIPT, str(tiny_models["teacher"]), str(image_folder), str(out)],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    checks, broken, broken_old_way = map(int, r.stdout.split())
    assert checks > 100 and broken == 0  # every step of three overwrites saw a complete index
    assert broken_old_way == 1  # the second rename found `out` missing
    with SearchIndex.open(out) as index:
        assert index.count == 10


def test_plain_build_fsyncs_every_file_and_the_folder_before_the_name_points_at_it(tmp_path, tiny_models,
                                                                                   image_folder, monkeypatch):
    events = []
    real_fsync, real_rename, real_exchange = os.fsync, os.rename, build_module.exchange

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(a, b, *rest, **kw):
        events.append(("rename", str(a), str(b)))
        return real_rename(a, b, *rest, **kw)

    def exchange(a, b):
        events.append(("exchange", str(a), str(b)))
        return real_exchange(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(build_module, "exchange", exchange)
    out = tmp_path / "index"
    for overwrite in (False, True):
        events.clear()
        build_index(tiny_models["teacher"], image_folder, out, classes="class_00", overwrite=overwrite,
                    progress=False)
        moves = [e for e in events if e[0] == ("exchange" if overwrite else "rename") and e[2] == str(out)]
        assert len(moves) == 1, events
        at = events.index(moves[0])
        new = Path(moves[0][1])
        synced_before = {e[1] for e in events[:at] if e[0] == "fsync"}
        assert {str(new / f) for f in os.listdir(out)} | {str(new)} <= synced_before
        assert ("fsync", str(out.parent)) in events[at:]  # and the rename itself made durable
    assert sorted(os.listdir(tmp_path)) == ["index"]
