"""Partial fine-tuning (`tune_units`): the trunk/tail split composes to the backbone for every kind of backbone,
only the tail and head change in training, the trunk maps are cached and reused, and the checkpoint is a whole
model whose image embeddings are those the tail was trained on."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from asymsearch.core.data import list_image_folder
from asymsearch.core.errors import UserError
from asymsearch.core.manifest import Preprocessing
from asymsearch.core.preprocess import load_and_preprocess
from asymsearch.training.backbones import backbone_units, split_backbone
from asymsearch.training.checkpoint import load_checkpoint, model_from_checkpoint
from asymsearch.training.config import StudentConfig, TeacherConfig
from asymsearch.training.models import create_backbone
from asymsearch.training.student import train_student
from asymsearch.training.teacher import train_teacher


@pytest.mark.parametrize("name", ["tiny_cnn", "efficientnet_lite0", "resnet18", "mobilenet_v3_small"])
def test_trunk_then_tail_is_the_backbone(name):
    torch.manual_seed(0)
    backbone = create_backbone(name)[0].eval()
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        whole = backbone(x)
        for tail_units in (1, len(backbone_units(backbone)) // 2):
            trunk, tail = split_backbone(backbone, tail_units)
            torch.testing.assert_close(tail(trunk(x)), whole, rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="tail_units must be between 1 and"):
        split_backbone(backbone, len(backbone_units(backbone)))


def teacher_cfg(data, out, weights, cache, **kw):
    base = dict(backbone="tiny_cnn_narrow", pretrained=weights, dim=8, image_size=32, epochs=2, lr=1e-2,
                backbone_lr=1e-2, workers=0, classes_per_batch=4, tune_units=6, trunk_cache=str(cache))
    return TeacherConfig(data=str(data), out=str(out), **{**base, **kw})


def test_teacher_trains_only_the_tail_and_its_checkpoint_is_the_whole_model(image_folder, tmp_path, tiny_weights):
    cache = tmp_path / "trunk"
    path = train_teacher(teacher_cfg(image_folder, tmp_path / "t.pt", tiny_weights, cache))
    ckpt = load_checkpoint(path)
    start = torch.load(tiny_weights)
    trained = {k[len("backbone."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("backbone.")}
    units = backbone_units(create_backbone("tiny_cnn_narrow")[0])
    n_trunk = len(units) - 6
    for key, value in start.items():  # TinyCNN is sequential: key "i.weight" belongs to unit i
        same = torch.equal(trained[key], value)
        if "running_" in key or key.endswith("num_batches_tracked"):
            assert same, key  # batch-norm statistics stay the pretrained ones, in the tail too
        else:
            assert same == (int(key.split(".")[0]) < n_trunk), key
    assert len(list(cache.glob("*.npy"))) == 2  # training and validation images
    # the whole model on an image = the embedding the tail saw in training (trunk map of the same pixels)
    model = model_from_checkpoint(ckpt)
    spec = Preprocessing.from_dict(ckpt["preprocessing"])
    item = list_image_folder(image_folder)[0]
    x = torch.from_numpy(load_and_preprocess(item.path, spec))[None]
    trunk, tail = split_backbone(model.backbone, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.head(tail(trunk(x))))
    # a second run reads the cached maps and trains the same way
    again = load_checkpoint(train_teacher(teacher_cfg(image_folder, tmp_path / "t2.pt", tiny_weights, cache)))
    assert [h["loss"] for h in again["history"]] == pytest.approx([h["loss"] for h in ckpt["history"]], rel=1e-5)
    assert len(list(cache.glob("*.npy"))) == 2


def test_student_trains_its_tail_against_the_teacher(image_folder, tmp_path, tiny_weights):
    teacher = train_teacher(teacher_cfg(image_folder, tmp_path / "t.pt", None, tmp_path / "trunk", tune_units=0,
                                        backbone="tiny_cnn", epochs=1))
    path = train_student(StudentConfig(data=str(image_folder), teacher=str(teacher), out=str(tmp_path / "s.pt"),
                                       backbone="tiny_cnn_narrow", pretrained=tiny_weights, tune_units=3,
                                       trunk_cache=str(tmp_path / "trunk"), epochs=2, batch_size=16, workers=0,
                                       image_size=24, lr=1e-2))
    ckpt = load_checkpoint(path)
    start = torch.load(tiny_weights)
    trained = {k[len("backbone."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("backbone.")}
    changed = {int(k.split(".")[0]) for k, v in start.items() if not torch.equal(trained[k], v)}  # weights only
    n_units = len(backbone_units(create_backbone("tiny_cnn_narrow")[0]))
    assert changed and min(changed) >= n_units - 3
    recalls = [(h["val_recall@1"], h["val_map"]) for h in ckpt["history"]]  # the best validation epoch, mAP
    assert ckpt["config"]["best_epoch"] == max(range(len(recalls)), key=lambda i: (recalls[i], -i)) + 1  # breaks ties
    assert all(np.isfinite(h["loss"]) for h in ckpt["history"])


def test_bad_tune_units_are_refused_before_training(image_folder, tmp_path, tiny_weights):
    with pytest.raises(UserError, match="give --pretrained"):
        train_teacher(teacher_cfg(image_folder, tmp_path / "a.pt", None, tmp_path / "c"))
    with pytest.raises(UserError, match="tail_units must be between 1 and"):
        train_teacher(teacher_cfg(image_folder, tmp_path / "b.pt", tiny_weights, tmp_path / "c", tune_units=99))
    with pytest.raises(UserError, match="nothing of the backbone to tune"):
        train_teacher(teacher_cfg(image_folder, tmp_path / "c.pt", tiny_weights, tmp_path / "c", backbone_lr=0.0))


def test_augmented_views_are_reproducible_crops_of_the_training_transform(image_folder):
    from asymsearch.core.preprocess import decode_image
    from asymsearch.training.data import augmented_view, view_seed

    spec = Preprocessing(resize=40, crop=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    img = decode_image(list_image_folder(image_folder)[0].path)
    a, b, c = (augmented_view(img, spec, seed=s) for s in (7, 7, 8))
    assert len({view_seed(v, i) for v in range(1, 4) for i in range(100)}) == 300
    assert a.shape == (3, 32, 32) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, load_and_preprocess(list_image_folder(image_folder)[0].path, spec))


def test_trunk_views_are_cached_apart_and_each_is_the_trunk_of_its_view(image_folder, tmp_path, tiny_weights):
    from asymsearch.core.preprocess import decode_image
    from asymsearch.training.data import augmented_view, view_seed
    from asymsearch.training.trunk import trunk_maps

    items = list_image_folder(image_folder)[:5]
    spec = Preprocessing(resize=32, crop=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    views = trunk_maps(items, "tiny_cnn_narrow", tiny_weights, spec, 3, str(tmp_path), torch.device("cpu"),
                       log=lambda *_: None, views=3)
    assert len(views) == 3 and len(list(tmp_path.glob("*.npy"))) == 3
    trunk = split_backbone(create_backbone("tiny_cnn_narrow", tiny_weights)[0].eval(), 3)[0]
    for v, i in ((0, 4), (1, 2), (2, 4)):
        pixels = load_and_preprocess(items[i].path, spec) if v == 0 else \
            augmented_view(decode_image(items[i].path), spec, seed=view_seed(v, i))
        with torch.no_grad():
            expected = trunk(torch.from_numpy(pixels)[None])[0].numpy()
        np.testing.assert_allclose(np.asarray(views[v][i], np.float32), expected, rtol=2e-2, atol=2e-3)  # float16
    assert not np.array_equal(views[1], views[2])
    again = trunk_maps(items, "tiny_cnn_narrow", tiny_weights, spec, 3, str(tmp_path), torch.device("cpu"),
                       log=lambda *_: None, views=2)  # read back from the cache, nothing new written
    assert len(list(tmp_path.glob("*.npy"))) == 3
    np.testing.assert_array_equal(again[1], views[1])


def test_maps_dataset_draws_every_view_of_the_same_image():
    from asymsearch.training.trunk import MapsDataset

    views = [np.full((4, 1, 2, 2), v, np.float16) + np.arange(4, dtype=np.float16)[:, None, None, None] * 10
             for v in range(3)]
    data = MapsDataset(views, [0, 0, 1, 1])
    torch.manual_seed(0)
    seen = {float(data[2][0][0, 0, 0]) for _ in range(60)}
    assert seen == {20.0, 21.0, 22.0}  # image 2 in each of its three views, never another image's
    with pytest.raises(ValueError):
        MapsDataset([views[0], views[1][:3]], [0, 0, 1, 1])


def test_teacher_with_views_caches_them_for_training_images_only(image_folder, tmp_path, tiny_weights):
    cache = tmp_path / "trunk"
    path = train_teacher(teacher_cfg(image_folder, tmp_path / "t.pt", tiny_weights, cache, trunk_views=3, epochs=1))
    assert len(list(cache.glob("*.npy"))) == 4  # three views of the training images, one of the validation images
    assert all(np.isfinite(h["loss"]) for h in load_checkpoint(path)["history"])
    for bad in (dict(trunk_views=0), dict(trunk_views=2, tune_units=0)):
        with pytest.raises(UserError, match="trunk_views"):
            train_teacher(teacher_cfg(image_folder, tmp_path / "b.pt", tiny_weights, cache, **bad))
    with pytest.raises(UserError, match="trunk_views"):
        train_student(StudentConfig(data=str(image_folder), teacher=str(path), out=str(tmp_path / "s.pt"),
                                    backbone="tiny_cnn_narrow", pretrained=tiny_weights, trunk_views=2))


def test_student_from_teacher_starts_as_the_teacher_and_caches_its_trunk(image_folder, tmp_path, tiny_weights):
    import json

    teacher = train_teacher(teacher_cfg(image_folder, tmp_path / "t.pt", tiny_weights, tmp_path / "trunk", epochs=1))
    t_ckpt = load_checkpoint(teacher)
    cache = tmp_path / "student-trunk"
    common = dict(data=str(image_folder), teacher=str(teacher), backbone="tiny_cnn_narrow", head="gem",
                  from_teacher=True, tune_units=3, trunk_cache=str(cache), batch_size=16, workers=0)
    untrained = load_checkpoint(train_student(StudentConfig(out=str(tmp_path / "s0.pt"), epochs=0, **common)))
    for key, value in t_ckpt["state_dict"].items():  # no epoch: the teacher's weights, exactly
        assert torch.equal(untrained["state_dict"][key], value), key
    assert untrained["teacher_id"] == t_ckpt["model_id"]
    # the cached maps come from the teacher's trunk, whose last units (the teacher tuned 6) differ from the file's
    spec = Preprocessing.from_dict(untrained["preprocessing"])
    metas = [json.loads(p.read_text()) for p in cache.glob("*.json")]
    path = metas[0]["paths"][0]
    (stem,) = [p.stem for p in cache.glob("*.json") if json.loads(p.read_text())["paths"][0] == path]
    x = torch.from_numpy(load_and_preprocess(path, spec))[None]
    trunk = split_backbone(model_from_checkpoint(t_ckpt).backbone, 3)[0]
    file_trunk = split_backbone(create_backbone("tiny_cnn_narrow", tiny_weights)[0].eval(), 3)[0]
    with torch.no_grad():
        want, from_file = trunk(x)[0].numpy(), file_trunk(x)[0].numpy()
    assert not np.allclose(want, from_file, atol=1e-2)
    cached = np.asarray(np.load(cache / f"{stem}.npy", mmap_mode="r")[0], np.float32)
    np.testing.assert_allclose(cached, want, rtol=2e-2, atol=2e-3)
    trained = load_checkpoint(train_student(StudentConfig(out=str(tmp_path / "s1.pt"), epochs=1, lr=1e-2, **common)))
    assert all(np.isfinite(h["loss"]) for h in trained["history"])
    with pytest.raises(UserError, match="--backbone tiny_cnn_narrow --head gem"):
        train_student(StudentConfig(out=str(tmp_path / "s2.pt"), **{**common, "backbone": "tiny_cnn"}))


def test_an_unreadable_image_leaves_no_half_written_cache(image_folder, tmp_path, tiny_weights):
    from asymsearch.core.data import ImageItem
    from asymsearch.core.errors import InvalidImage
    from asymsearch.training.featcache import feature_maps

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    items = list_image_folder(image_folder)[:3] + [ImageItem(path=str(broken), label="x")]
    spec = Preprocessing(resize=32, crop=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    cache = tmp_path / "cache"
    with pytest.raises(InvalidImage):  # the first batch of two was written before the second failed
        feature_maps(items, "tiny_cnn_narrow", tiny_weights, spec, cache, batch_size=2, log=lambda *_: None)
    assert list(cache.iterdir()) == []
