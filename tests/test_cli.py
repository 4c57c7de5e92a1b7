"""The command line: clear one-line errors, never a traceback, and --help for every stage."""
from __future__ import annotations

import subprocess
import sys

import pytest

from asymsearch.cli.main import build_parser, main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "asymsearch.cli.main", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("command", [["train", "teacher"], ["train", "student"], ["export"], ["index", "build"],
                                     ["serve"], ["query"], ["web"], ["eval"], ["demo"]])
def test_every_stage_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*command, "--help"])
    assert e.value.code == 0
    assert "usage: asymsearch" in capsys.readouterr().out


def one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    return lines[-1]


def test_missing_folder_is_one_line(tmp_path):
    r = run_cli("index", "build", "--teacher", str(tmp_path / "t.onnx"), "--images", str(tmp_path),
                "--out", str(tmp_path / "idx"))
    assert "teacher ONNX model not found" in one_line_error(r)


def test_unknown_backbone_lists_the_valid_names(tmp_path, image_folder):
    r = run_cli("train", "teacher", "--data", str(image_folder), "--out", str(tmp_path / "t.pt"),
                "--backbone", "resnet5000", "--epochs", "1")
    line = one_line_error(r)
    assert r.returncode == 2
    assert "resnet5000" in line and "resnet50" in line and "tiny_cnn" in line


def test_missing_data_folder_in_training_is_one_line(tmp_path, capsys):
    assert main(["train", "teacher", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "t.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not found" in err[0]
