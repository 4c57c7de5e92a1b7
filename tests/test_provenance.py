"""Every results JSON records where its figures came from: the commit, the command, the machine and the date."""
from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
from pathlib import Path

from asymsearch.core.provenance import provenance

ROOT = Path(__file__).resolve().parents[1]


def test_provenance_names_this_commit_the_command_and_the_machine():
    p = provenance(["asymsearch", "bench", "index", "--items", "1000"], cwd=ROOT)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode == 0:  # a source checkout; a bare wheel install has no git to ask
        assert p["commit"] == head.stdout.strip() and isinstance(p["dirty"], bool)
    assert p["command"] == "asymsearch bench index --items 1000"
    assert p["machine"]["cores"] == os.cpu_count() and p["machine"]["usable_cores"] >= 1
    assert isinstance(p["machine"]["gpu"], list)
    age = dt.datetime.now(dt.timezone.utc) - dt.datetime.fromisoformat(p["date"])
    assert dt.timedelta(0) <= age < dt.timedelta(minutes=5)
    json.dumps(p)  # goes into results files as it is


def test_a_command_with_spaces_reads_back_as_one_shell_line():
    assert provenance(["asymsearch", "eval", "--data", "my images/x"])["command"] == \
        "asymsearch eval --data 'my images/x'"


def test_outside_a_checkout_the_commit_is_none_not_an_error(tmp_path):
    assert provenance(["x"], cwd=tmp_path)["commit"] is None


def test_every_results_json_in_the_docs_records_its_provenance():
    missing = [f.name for f in sorted((ROOT / "docs" / "results").glob("*.json"))
               if "provenance" not in json.loads(f.read_text())]
    assert not missing, missing
