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


@pytest.fixture
def tiny_weights(tmp_path):
    """A 'pretrained' tiny_cnn_narrow state dict (the tiny backbones take weights only from a file)."""
    torch.manual_seed(1)
    path = tmp_path / "tiny.pth"
    torch.save(create_backbone("tiny_cnn_narrow")[0].state_dict(), path)
    return str(path)


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
    assert all(np.isfinite(h["loss"]) for h in ckpt["history"])


def test_bad_tune_units_are_refused_before_training(image_folder, tmp_path, tiny_weights):
    with pytest.raises(UserError, match="give --pretrained"):
        train_teacher(teacher_cfg(image_folder, tmp_path / "a.pt", None, tmp_path / "c"))
    with pytest.raises(UserError, match="tail_units must be between 1 and"):
        train_teacher(teacher_cfg(image_folder, tmp_path / "b.pt", tiny_weights, tmp_path / "c", tune_units=99))
    with pytest.raises(UserError, match="nothing of the backbone to tune"):
        train_teacher(teacher_cfg(image_folder, tmp_path / "c.pt", tiny_weights, tmp_path / "c", backbone_lr=0.0))
