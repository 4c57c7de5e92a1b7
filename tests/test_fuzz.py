"""The fuzz targets of tests/fuzz/ (docs/fuzzing.md): each runs under atheris (libFuzzer) in a subprocess for
ASYMSEARCH_FUZZ_SECONDS (default 30), and any input that breaks an invariant is saved by libFuzzer under
tests/fuzz/regressions/<target>/ and fails the run. Every file in those folders is replayed here on every run, so
a crash found once stays a test; a file with a NAME.xfail beside it is a known open bug (the .xfail holds the
reason) and its replay is a strict xfail: it must keep failing until the bug is fixed, then the .xfail goes."""
from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent / "fuzz"
REGRESSIONS = FUZZ / "regressions"
TARGETS = {"decode": FUZZ / "fuzz_decode.py", "requests": FUZZ / "fuzz_requests.py"}
SECONDS = int(os.environ.get("ASYMSEARCH_FUZZ_SECONDS", "30"))
MARGIN_S = 300  # start-up, the final check, and a slow machine: a bound on the wait, not an assertion on speed


@functools.cache
def _load(target: str):
    """The target's module (loaded once; without atheris it loads too, only running inputs needs it)."""
    spec = importlib.util.spec_from_file_location(f"asymsearch_fuzz_{target}", TARGETS[target])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def saved_inputs(target: str) -> list[Path]:
    folder = REGRESSIONS / target
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix != ".xfail") if folder.is_dir() else []


def replay_cases() -> list:
    cases = []
    for target in TARGETS:
        for path in saved_inputs(target):
            reason = path.with_name(path.name + ".xfail")
            # a known request bug must fail as that bug (KnownIssue); anything else fails the test
            raises = _load("requests").KnownIssue if target == "requests" else None
            marks = [pytest.mark.xfail(strict=True, raises=raises, reason=reason.read_text().strip())
                     ] if reason.exists() else []
            cases.append(pytest.param(target, path, marks=marks, id=f"{target}/{path.name}"))
    return cases


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz_target_for_a_bounded_time(target, tmp_path):
    pytest.importorskip("atheris", reason="the fuzzer is in the dev extra: pip install -e '.[dev]'")
    out = REGRESSIONS / target
    out.mkdir(parents=True, exist_ok=True)
    before = set(saved_inputs(target))
    (tmp_path / "corpus").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "ASYMSEARCH_FUZZ_STRICT"}  # known open bugs: counted
    proc = subprocess.run(
        [sys.executable, str(TARGETS[target]), f"-max_total_time={SECONDS}", f"-artifact_prefix={out}/",
         "-timeout=120", "-rss_limit_mb=4096", "-print_final_stats=1", str(tmp_path / "corpus")],
        check=False, capture_output=True, text=True, timeout=SECONDS + MARGIN_S, env=env, cwd=FUZZ.parents[1])
    log = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines()
                    if " NEW " not in line and " REDUCE " not in line and not line.startswith("INFO: Instrumenting"))
    new = sorted(set(saved_inputs(target)) - before)
    assert proc.returncode == 0 and not new, \
        f"fuzz target {target} failed (rc {proc.returncode}); input saved as {[str(p) for p in new]}:\n{log[-6000:]}"
    if target == "requests":  # it ends on its own final check: a good query, then health SERVING
        assert "after them a good query got its hits and health was SERVING" in proc.stdout, log[-6000:]
    else:
        assert "Done " in proc.stderr, log[-6000:]  # libFuzzer's own end of a run ("Done N runs in S second(s)")


@pytest.fixture(scope="module")
def request_target(tmp_path_factory):
    pytest.importorskip("atheris", reason="replaying request inputs needs atheris' FuzzedDataProvider")
    module = _load("requests")
    target = module.Target(tmp_path_factory.mktemp("fuzz-requests"))
    yield target
    target.close()


@pytest.mark.parametrize("target, path", replay_cases())
def test_saved_input_replays_cleanly(target, path, request):
    """A saved input (a crash found once) passes every invariant of its target; a request input is followed by a
    good query that must get its hits and a health check that must say SERVING."""
    data = path.read_bytes()
    if target == "decode":
        _load("decode").check(data)
        return
    served = request.getfixturevalue("request_target")
    try:
        served.check(data, strict=True)
    finally:
        served.check_alive()


def test_every_known_issue_has_its_regression_input():
    """The open bugs the request target tolerates while fuzzing (its ISSUES) each have a saved input whose replay is
    a strict xfail naming it, so a fix shows up as an XPASS that fails the run."""
    pytest.importorskip("atheris")
    issues = _load("requests").ISSUES
    reasons = [p.with_name(p.name + ".xfail").read_text() for p in saved_inputs("requests")
               if p.with_name(p.name + ".xfail").exists()]
    assert sorted(key for key in issues if any(r.startswith(f"{key}:") for r in reasons)) == sorted(issues)
