"""Row alignment of the compatibility regression (`train teacher --compatible-with OLD --compat-regression W`):
every batch row of the teacher's training loop must be regressed onto the old teacher's vector of ITS image.

Each image is one solid colour (PNG, no compression loss), so it stays identifiable through any crop, flip or trunk
map; the old teacher is a linear ONNX model, whose vector of each image the test computes on its own, image by
image. The spy records, for every step, what the loop fed the network and the old vectors the regression term
took for those rows (`CompatibilityTerm.old[step.idx]`); each row's image is then read back from its input and its
target compared with that image's own old vector. Run through the real `train_teacher` (m-per-class sampler,
DataLoader, `_Indexed`, the cache of old vectors), on pixels and on cached trunk maps (`--tune-units`, the path of
docs/results/upgrades.md), with classes listed in a non-sorted order as the upgrade experiment's 40 fit classes
are.
"""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import make_linear_onnx

CLASSES, PER_CLASS, SIZE = 6, 5, 40


def _colours(n: int) -> list[tuple[int, int, int]]:
    """n colours whose normalised pixel vectors (2c/255 - 1) point in well separated directions."""
    levels = (30, 80, 130, 180, 230)
    chosen: list[tuple[int, int, int]] = []
    for c in itertools.product(levels, repeat=3):
        v = 2 * np.asarray(c) / 255 - 1
        if np.linalg.norm(v) < 0.3:
            continue
        if all(abs(np.dot(v, w := 2 * np.asarray(o) / 255 - 1)) / np.linalg.norm(v) / np.linalg.norm(w) < 0.97
               for o in chosen):
            chosen.append(c)
        if len(chosen) == n:
            return chosen
    raise AssertionError("not enough separated colours")


def _write_colour_folder(root, classes: int, per_class: int) -> dict[str, tuple[int, int, int]]:
    """classes x per_class solid-colour PNGs under root/class_XX/; {path: colour}."""
    colours = iter(_colours(classes * per_class))
    by_path = {}
    for c in range(classes):
        (root / f"class_{c:02d}").mkdir(parents=True)
        for i in range(per_class):
            path = root / f"class_{c:02d}" / f"{i:04d}.png"
            colour = next(colours)
            Image.new("RGB", (SIZE, SIZE), colour).save(path)
            by_path[str(path)] = colour
    return by_path


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("colours")
    return root, _write_colour_folder(root, CLASSES, PER_CLASS)


class _Spy:
    """Records each step's network input and the old vectors the regression term used for its rows."""

    def __init__(self, monkeypatch):
        from asymsearch.training import compat, engine
        self.inputs, self.targets = [], []
        step, loss_term = engine.Engine.step, compat.CompatibilityTerm.loss_term

        def spy_step(eng, train_net, batch):
            self.inputs.append(batch[0].detach().clone())
            return step(eng, train_net, batch)

        def spy_loss_term(term, s):
            self.targets.append(term.old[s.idx].detach().cpu().clone())
            return loss_term(term, s)

        monkeypatch.setattr(engine.Engine, "step", spy_step)
        monkeypatch.setattr(compat.CompatibilityTerm, "loss_term", spy_loss_term)


def _old_vector_of_each_image(onnx, paths) -> np.ndarray:
    """The old teacher's vector of each image, one image per call (no batch, no cache)."""
    from asymsearch.core.ort import OnnxEmbedder
    from asymsearch.core.preprocess import load_and_preprocess
    embedder = OnnxEmbedder(onnx)
    spec = embedder.manifest.preprocessing
    return np.concatenate([embedder.embed_arrays(load_and_preprocess(p, spec)[None]) for p in paths])


def _signatures(paths, by_path, cfg) -> np.ndarray:
    """Each image as the loop sees it: its colour after normalisation (pixels), or the per-channel mean of its trunk
    map (flip-invariant; the trunk run here image by image, not through the cache)."""
    from asymsearch.core.preprocess import load_and_preprocess
    from asymsearch.training.backbones import split_backbone
    from asymsearch.training.models import create_backbone
    from asymsearch.training.teacher import teacher_preprocessing

    spec = teacher_preprocessing(cfg)
    if not cfg.tune_units:
        return np.stack([(np.asarray(by_path[p]) / 255 - np.asarray(spec.mean)) / np.asarray(spec.std)
                         for p in paths])
    trunk = split_backbone(create_backbone(cfg.backbone, cfg.pretrained)[0], cfg.tune_units)[0].eval()
    with torch.no_grad():
        return np.stack([trunk(torch.from_numpy(load_and_preprocess(p, spec))[None]).mean(dim=(2, 3))[0].numpy()
                         for p in paths])


def _check_rows(spy: _Spy, sig: np.ndarray, want: np.ndarray, atol: float) -> int:
    """Every recorded row's regression target == the old vector of the image its input shows; the rows checked."""
    assert spy.targets and len(spy.targets) == len(spy.inputs)
    rows = 0
    for x, target in zip(spy.inputs, spy.targets):
        dist = ((x.float().mean(dim=(2, 3)).numpy()[:, None, :] - sig[None]) ** 2).sum(-1)
        image = np.argmin(dist, axis=1)  # each row's image
        gap = np.sort(dist, axis=1)
        assert (gap[:, 0] < 1e-2 * gap[:, 1]).all(), "a batch row matches no image unambiguously"
        off = np.linalg.norm(target.numpy()[:, None, :] - want[None], axis=-1)  # (rows, images)
        assert (np.argmin(off, axis=1) == image).all() and (off[np.arange(len(x)), image] <= atol).all(), \
            "a row was regressed onto another image's old vector"
        rows += len(x)
    return rows


def _check_distinct(want: np.ndarray, atol: float) -> None:
    """Test set-up: every two images' old vectors lie further apart than 4x the tolerance a row's target gets."""
    d = np.linalg.norm(want[:, None] - want[None], axis=-1) + np.eye(len(want)) * 1e9
    assert d.min() > 4 * atol, f"test set-up: two images' old vectors {d.min():.2g} apart"


def _old_teacher(tmp_path, paths):
    """A linear old teacher (ONNX) and its vector of each of `paths`, computed image by image."""
    rng = np.random.default_rng(0)
    onnx = make_linear_onnx(tmp_path / "old.onnx", role="teacher", teacher_id="old", weight=rng.normal(size=(48, 8)))
    want = _old_vector_of_each_image(onnx, paths)
    _check_distinct(want, 1e-4)
    return onnx, want


@pytest.mark.parametrize("tune_units", [0, 1], ids=["pixels", "trunk-maps"])
def test_every_regressed_row_gets_the_old_vector_of_its_own_image(colour_folder, tmp_path, monkeypatch,
                                                                  tiny_weights, tune_units):
    from asymsearch.training.config import TeacherConfig
    from asymsearch.training.teacher import train_teacher

    root, by_path = colour_folder
    paths = sorted(by_path)
    old_onnx, want = _old_teacher(tmp_path, paths)
    # the classes in a non-sorted order (the experiment's --classes A,B,... lists): items are sorted by class
    classes = ",".join(f"class_{c:02d}" for c in (3, 0, 5, 1, 4, 2))
    spy = _Spy(monkeypatch)
    cfg = TeacherConfig(data=str(root), classes=classes, backbone="tiny_cnn_narrow", dim=8, image_size=32, epochs=2,
                        lr=1e-3, workers=0, classes_per_batch=3, per_class=2, val_fraction=0, floor=False,
                        seed=3, compatible_with=str(old_onnx), compat_weight=1.0, compat_regression=4.0,
                        out=str(tmp_path / "new.pt"), trunk_cache=str(tmp_path / "cache" / "trunk"),
                        **(dict(tune_units=tune_units, pretrained=tiny_weights) if tune_units else {}))
    train_teacher(cfg)
    # a second run finds the old vectors in their cache: it must pair them with the same rows
    train_teacher(dataclasses.replace(cfg, out=str(tmp_path / "new2.pt")))
    assert _check_rows(spy, _signatures(paths, by_path, cfg), want, atol=1e-4) >= 2 * 2 * 5 * 6


def test_old_vectors_prefilled_by_the_upgrade_experiment_reach_their_own_rows(tmp_path, monkeypatch, tiny_weights):
    """docs/results/upgrades.md's path: `experiments.upgrades split-cache` slices the fit classes' trunk maps out
    of the training half's, `prefill-old` writes OLD's vectors of the fit classes from those maps into the cache
    `train teacher --compatible-with OLD.onnx` reads, and a NEW teacher trains on the fit classes (`--classes
    A,B,...`, tune_units 1) with the regression."""
    from asymsearch.export.onnx_export import export_checkpoint
    from asymsearch.training.config import TeacherConfig
    from asymsearch.training.teacher import train_teacher
    from experiments import upgrades

    root = tmp_path / "images"
    by_path = _write_colour_folder(root, 12, 4)  # first half: 6 classes, 2 of them validation, 4 fit
    _, fit_items, val_items = upgrades.fit_val_items(str(root))
    assert len({it.label for it in fit_items}) == 4 and len({it.label for it in val_items}) == 2
    trunk = str(tmp_path / "cache" / "trunk")
    base = dict(data=str(root), backbone="tiny_cnn_narrow", dim=8, image_size=32, lr=1e-3, workers=0,
                classes_per_batch=2, per_class=2, val_fraction=0, floor=False, tune_units=1,
                pretrained=tiny_weights, trunk_cache=trunk)
    old_pt = train_teacher(TeacherConfig(classes="first-half", epochs=1, seed=0, out=str(tmp_path / "old.pt"),
                                         **base))
    old_onnx = tmp_path / "old.onnx"
    export_checkpoint(old_pt, old_onnx)
    upgrades.main(["split-cache", "--data", str(root), "--checkpoint", str(old_pt), "--trunk-cache", trunk])
    upgrades.main(["prefill-old", "--data", str(root), "--old", str(old_pt), "--onnx", str(old_onnx),
                   "--classes", "both", "--trunk-cache", trunk])
    fit_paths = sorted(str(it.path) for it in fit_items)
    want = _old_vector_of_each_image(old_onnx, fit_paths)
    _check_distinct(want, 2e-3)

    spy = _Spy(monkeypatch)
    fit_classes = list(dict.fromkeys(it.label for it in fit_items))  # as listed to `--classes` (their order)
    cfg = TeacherConfig(classes=",".join(fit_classes), epochs=2, seed=1, compatible_with=str(old_onnx),
                        compat_regression=4.0, out=str(tmp_path / "new.pt"), **base)
    prefilled = {f: f.stat().st_mtime_ns for f in (tmp_path / "cache" / "old-teacher").iterdir()}
    train_teacher(cfg)
    # the training read prefill-old's vectors (a cache miss would have embedded with the ONNX file and rewritten)
    assert {f: f.stat().st_mtime_ns for f in (tmp_path / "cache" / "old-teacher").iterdir()} == prefilled
    # the prefilled vectors come from float16 trunk maps: equal to the ONNX model's to about 1e-3
    assert _check_rows(spy, _signatures(fit_paths, by_path, cfg), want, atol=2e-3) >= 2 * 2 * 4
