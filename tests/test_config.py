"""Stage configs: defaults < --config FILE.yaml < KEY=VALUE < explicit flags, one-line errors for bad keys and
values (exit 2 before any work), the merged config saved beside every artifact and reproducing it when loaded back
with --config, and `asymsearch info` on each kind of artifact through a real subprocess."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import yaml

from asymsearch.cli.main import main
from asymsearch.core.config import config_path_for, merge_config, to_object
from asymsearch.core.errors import UserError
from asymsearch.index.config import IndexBuildConfig


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "asymsearch.cli.main", *map(str, args)], capture_output=True,
                          text=True, timeout=300, cwd=cwd)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@dataclasses.dataclass
class Inner:
    depth: int = 1
    name: str = "x"


@dataclasses.dataclass
class Toy:
    data: str
    epochs: int = 10
    lr: float = 0.1
    tag: Optional[str] = None
    inner: Inner = dataclasses.field(default_factory=Inner)


# ---- the merge itself --------------------------------------------------------------------------------------------

def test_each_layer_overrides_the_one_before(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data: from-file\nepochs: 3\nlr: 0.5\ninner:\n  depth: 7\n")
    assert to_object(merge_config(Toy, overrides=["data=d"])) == Toy(data="d")  # defaults
    c = to_object(merge_config(Toy, file=f))
    assert (c.data, c.epochs, c.lr, c.inner.depth, c.inner.name) == ("from-file", 3, 0.5, 7, "x")
    c = to_object(merge_config(Toy, file=f, overrides=["epochs=4", "inner.name=y"]))
    assert (c.epochs, c.lr, c.inner.name, c.inner.depth) == (4, 0.5, "y", 7)  # KEY=VALUE over the file
    c = to_object(merge_config(Toy, file=f, overrides=["epochs=4"], explicit={"epochs": 5, "inner.depth": 8}))
    assert (c.epochs, c.lr, c.inner.depth) == (5, 0.5, 8)  # an explicit flag over KEY=VALUE


@pytest.mark.parametrize("override, expected", [
    (["epoch=3"], "unknown config key 'epoch'.*closest valid keys: epochs"),
    (["inner.dept=3"], "unknown config key 'inner.dept'.*inner.depth"),
    (["epochs=ten"], "config key epochs must be int"),
    (["lr=fast"], "config key lr must be float"),
    (["noequals"], "must read KEY=VALUE"),
])
def test_bad_keys_and_values_are_one_line(override, expected):
    with pytest.raises(UserError, match=expected) as e:
        merge_config(Toy, overrides=["data=d", *override])
    assert "\n" not in str(e.value)


def test_missing_required_key_and_bad_file(tmp_path):
    with pytest.raises(UserError, match="missing required config key data"):
        merge_config(Toy)
    with pytest.raises(UserError, match="config file not found"):
        merge_config(Toy, file=tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(UserError, match="mapping"):
        merge_config(Toy, file=tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("epochs: [1\n")
    with pytest.raises(UserError, match="not valid YAML"):
        merge_config(Toy, file=tmp_path / "bad.yaml")
    (tmp_path / "typo.yaml").write_text("data: d\nepohcs: 3\n")
    with pytest.raises(UserError, match=r"unknown config key 'epohcs' \(in .*typo.yaml\).*epochs"):
        merge_config(Toy, file=tmp_path / "typo.yaml")


def test_config_paths():
    assert config_path_for("a/teacher.pt") == Path("a/teacher.pt.config.yaml")
    assert config_path_for("a/teacher.onnx") == Path("a/teacher.onnx.config.yaml")  # not the checkpoint's
    assert config_path_for("a/teacher.json") == Path("a/teacher.onnx.config.yaml")


# ---- index build through the command line ------------------------------------------------------------------------

def build(tmp_path: Path, tiny_models, image_folder, *extra: str) -> int:
    return main(["index", "build", "--teacher", str(tiny_models["teacher"]), "--images", str(image_folder),
                 *map(str, extra)])


def test_index_build_precedence_flag_over_key_value_over_file(tmp_path, tiny_models, image_folder):
    f = tmp_path / "build.yaml"
    f.write_text(f"out: {tmp_path / 'from-file'}\nfactory: HNSW16\nbatch_size: 7\nsearch_params:\n  efSearch: 32\n")
    assert build(tmp_path, tiny_models, image_folder, "--config", f) == 0
    saved = load_yaml(tmp_path / "from-file" / "config.yaml")
    assert (saved["factory"], saved["batch_size"], saved["search_params"]) == ("HNSW16", 7, {"efSearch": 32})
    # KEY=VALUE beats the file; a flag beats KEY=VALUE of the same key
    assert build(tmp_path, tiny_models, image_folder, "--config", f, f"out={tmp_path / 'kv'}", "batch_size=9",
                 "search_params.efSearch=64") == 0
    saved = load_yaml(tmp_path / "kv" / "config.yaml")
    assert (saved["batch_size"], saved["search_params"], saved["factory"]) == (9, {"efSearch": 64}, "HNSW16")
    manifest = json.loads((tmp_path / "kv" / "manifest.json").read_text())
    assert manifest["search_params"] == {"efSearch": 64} and manifest["build"]["batch_size"] == 9
    assert build(tmp_path, tiny_models, image_folder, "--config", f, f"out={tmp_path / 'flag'}", "factory=HNSW8",
                 "--factory", "HNSW32", "batch_size=9", "--batch-size", "5") == 0
    saved = load_yaml(tmp_path / "flag" / "config.yaml")
    assert (saved["factory"], saved["batch_size"]) == ("HNSW32", 5)
    assert json.loads((tmp_path / "flag" / "manifest.json").read_text())["factory"] == "HNSW32"


def test_index_build_bad_input_exits_2_before_any_work(tmp_path, tiny_models, image_folder):
    base = ("index", "build", "--teacher", tiny_models["teacher"], "--images", image_folder, "--out", tmp_path / "i")
    line = one_line_error(run_cli(*base, "factroy=Flat"))
    assert "factroy" in line and "factory" in line
    line = one_line_error(run_cli(*base, "batch_size=ten"))
    assert "batch_size" in line and "int" in line
    line = one_line_error(run_cli(*base, "engine=spark"))
    assert "engine" in line and "local" in line
    line = one_line_error(run_cli("index", "build", "--images", image_folder, "--out", tmp_path / "i"))
    assert "missing required config key teacher" in line
    assert not (tmp_path / "i").exists() and not list(tmp_path.glob(".i.*"))


def test_saved_index_config_reproduces_the_build(tmp_path, tiny_models, image_folder):
    assert build(tmp_path, tiny_models, image_folder, "--out", tmp_path / "a", "--factory", "IVF2,Flat",
                 "--search-param", "nprobe=2", "--classes", "first-half") == 0
    saved = tmp_path / "a" / "config.yaml"
    first = load_yaml(saved)
    assert first["out"] == str((tmp_path / "a").resolve()) and first["classes"] == "first-half"
    # the saved file, read back, is exactly the merged config
    assert dataclasses.asdict(to_object(merge_config(IndexBuildConfig, file=saved))) == first
    assert main(["index", "build", "--config", str(saved), f"out={tmp_path / 'b'}"]) == 0
    second = load_yaml(tmp_path / "b" / "config.yaml")
    assert {**second, "out": first["out"]} == first
    ma, mb = (json.loads((tmp_path / n / "manifest.json").read_text()) for n in ("a", "b"))
    for key in ("teacher_id", "factory", "count", "search_params", "teacher_model"):
        assert ma[key] == mb[key]
    assert (tmp_path / "a" / "meta.sqlite").read_bytes() == (tmp_path / "b" / "meta.sqlite").read_bytes()


def test_versioned_root_keeps_the_build_config_through_an_add(tmp_path, tiny_models, image_folder):
    root = tmp_path / "root"
    assert build(tmp_path, tiny_models, image_folder, "--out", root, "--versioned", "--classes", "first-half") == 0
    assert main(["index", "add", "--index", str(root), "--teacher", str(tiny_models["teacher"]),
                 "--images", str(image_folder / sorted(p.name for p in image_folder.iterdir())[-1])]) == 0
    r = run_cli("info", root, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["kind"] == "index" and info["version"] == "v000002"
    assert info["config"]["classes"] == "first-half" and info["config"]["versioned"] is True


# ---- the other stages --------------------------------------------------------------------------------------------

def test_serve_and_eval_take_keys_too(tmp_path, tiny_models, image_folder):
    line = one_line_error(run_cli("serve", "--index", tmp_path, "--student", tiny_models["student"], "port=abc"))
    assert "port" in line and "int" in line
    line = one_line_error(run_cli("eval", "--data", image_folder, "batch_sise=3"))
    assert "batch_sise" in line and "batch_size" in line
    f = tmp_path / "eval.yaml"
    f.write_text(f"teacher: {tiny_models['teacher']}\nstudent: {tiny_models['student']}\nclasses: second-half\n")
    r = run_cli("eval", "--data", image_folder, "--config", f, "--json")
    assert r.returncode == 0, r.stderr
    assert set(json.loads(r.stdout)) == {"teacher_teacher", "student_student", "student_teacher"}
    f.write_text("teacher: /no/such/teacher.onnx\n")  # a value from a file is checked as the flag checks it
    line = one_line_error(run_cli("eval", "--data", image_folder, "--config", f, "student=" +
                                  str(tiny_models["student"])))
    assert "teacher ONNX model not found" in line


@pytest.fixture(scope="module")
def trained(tmp_path_factory, image_folder):
    """A one-step tiny teacher trained through the command line with KEY=VALUE and a flag, and its ONNX export."""
    out = tmp_path_factory.mktemp("trained")
    args = ["train", "teacher", "--data", str(image_folder), f"out={out / 't.pt'}", "backbone=tiny_cnn", "dim=16",
            "image_size=32", "epochs=3", "--epochs", "1", "max_steps_per_epoch=1", "workers=0", "val_fraction=0"]
    assert main(args) == 0
    assert main(["export", "--checkpoint", str(out / "t.pt"), "--out", str(out / "t.onnx"), "tolerance=1e-3"]) == 0
    return out


def test_training_bad_input_exits_2_before_any_work(tmp_path, image_folder):
    base = ("train", "teacher", "--data", image_folder, "--out", tmp_path / "t.pt", "--backbone", "tiny_cnn")
    line = one_line_error(run_cli(*base, "epochs=ten"))
    assert "epochs" in line and "int" in line
    line = one_line_error(run_cli(*base, "metrixx=input"))
    assert "metrixx" in line and "metrix" in line
    assert not list(tmp_path.iterdir())


def test_checkpoint_config_is_saved_and_reproduces_the_model(trained, tmp_path):
    saved = config_path_for(trained / "t.pt")
    config = load_yaml(saved)
    assert config["epochs"] == 1 and config["backbone"] == "tiny_cnn"  # the flag beat epochs=3
    assert config["out"] == str((trained / "t.pt").resolve())
    assert main(["train", "teacher", "--config", str(saved), f"out={tmp_path / 'again.pt'}"]) == 0
    assert {**load_yaml(tmp_path / "again.pt.config.yaml"), "out": config["out"]} == config
    a = json.loads(run_cli("info", trained / "t.pt", "--json").stdout)
    b = json.loads(run_cli("info", tmp_path / "again.pt", "--json").stdout)
    assert a["ids"]["model_id"] == b["ids"]["model_id"]  # same config, same seed: the same weights


def test_onnx_config_is_saved_and_reproduces_the_export(trained, tmp_path):
    saved = config_path_for(trained / "t.onnx")
    config = load_yaml(saved)
    assert config["tolerance"] == 1e-3 and config["checkpoint"] == str((trained / "t.pt").resolve())
    assert main(["export", "--config", str(saved), f"out={tmp_path / 'again.onnx'}"]) == 0
    assert {**load_yaml(tmp_path / "again.onnx.config.yaml"), "out": config["out"]} == config
    first, again = (json.loads(p.read_text()) for p in (trained / "t.json", tmp_path / "again.json"))
    assert (first["model_id"], first["teacher_id"]) == (again["model_id"], again["teacher_id"])


def test_info_on_each_artifact_kind(trained, tmp_path, image_folder):
    ckpt = json.loads(run_cli("info", trained / "t.pt", "--json").stdout)
    manifest = json.loads((trained / "t.json").read_text())
    assert ckpt["kind"] == "checkpoint" and ckpt["role"] == "teacher"
    assert ckpt["ids"] == {"model_id": manifest["model_id"], "teacher_id": manifest["teacher_id"]}
    assert ckpt["config"] == load_yaml(trained / "t.pt.config.yaml")
    for path in (trained / "t.onnx", trained / "t.json"):
        model = json.loads(run_cli("info", path, "--json").stdout)
        assert model["kind"] == "model" and model["ids"]["model_id"] == manifest["model_id"]
        assert model["ids"]["sha256"] == manifest["sha256"]
        assert model["config"] == load_yaml(trained / "t.onnx.config.yaml")
    assert main(["index", "build", "--teacher", str(trained / "t.onnx"), "--images", str(image_folder),
                 "--out", str(tmp_path / "idx")]) == 0
    index = json.loads(run_cli("info", tmp_path / "idx", "--json").stdout)
    assert index["kind"] == "index" and index["ids"]["teacher_id"] == manifest["teacher_id"]
    assert index["ids"]["teacher_model_id"] == manifest["model_id"]
    assert len(index["ids"]["index_manifest_id"]) == 16
    assert index["config"]["teacher"] == str((trained / "t.onnx").resolve())
    text = run_cli("info", tmp_path / "idx")  # the plain-text form names the ids and prints the config
    assert text.returncode == 0 and f"teacher_id: {manifest['teacher_id']}" in text.stdout
    assert "factory: Flat" in text.stdout
    line = one_line_error(run_cli("info", tmp_path / "nothing-here"))
    assert "not found" in line
    (tmp_path / "x.txt").write_text("hi")
    assert "is not a checkpoint" in one_line_error(run_cli("info", tmp_path / "x.txt"))


def test_the_add_on_options_are_one_nested_config_of_both_trainers_with_their_flags_as_sugar(tmp_path):
    """`addons.metrix=input`, `--metrix input` and a YAML `addons:` section set the same key of TeacherConfig and
    StudentConfig (training.config.AddOnOptions); the launcher hands the nested keys to torchrun workers as flags."""
    from asymsearch.cli import cmd_train
    from asymsearch.cli.main import build_parser
    from asymsearch.cli.options import config_from_args
    from asymsearch.training.config import AddOnOptions, StudentConfig, TeacherConfig

    def parsed(cls, *argv):  # as main() does: flags over the config layers
        args = build_parser().parse_args(list(argv))
        args.config_binding.apply(args)
        return config_from_args(cls, args)

    teacher = ("train", "teacher", "--data", "d", "--out", "o.pt")
    want = AddOnOptions(metrix="input", osm_alpha=0.3, message_passing=2)
    by_keys = parsed(TeacherConfig, *teacher, "addons.metrix=input", "addons.osm_alpha=0.3", "addons.message_passing=2")
    by_flags = parsed(TeacherConfig, *teacher, "--metrix", "input", "--osm-alpha", "0.3", "--message-passing", "2")
    (tmp_path / "c.yaml").write_text("addons:\n  metrix: input\n  osm_alpha: 0.3\n  message_passing: 2\n")
    by_file = parsed(TeacherConfig, *teacher, "--config", str(tmp_path / "c.yaml"))
    assert by_keys.addons == by_flags.addons == by_file.addons == want
    assert parsed(TeacherConfig, *teacher, "addons.metrix=embedding", "--metrix", "input").addons.metrix == "input"
    student = parsed(StudentConfig, "train", "student", "--data", "d", "--teacher", "t.pt", "--out", "s.pt",
                     "--osm-caa", "addons.caa_weight=0.5")
    assert student.addons == AddOnOptions(osm_caa=True, caa_weight=0.5)
    assert parsed(TeacherConfig, "train", "teacher", *cmd_train.config_argv(by_flags)) == by_flags
    with pytest.raises(UserError, match="addons.metrix"):
        parsed(TeacherConfig, *teacher, "metrix=input")  # the key is the nested one
