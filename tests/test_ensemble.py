"""`train ensemble`: teachers joined into one teacher whose embedding is the concatenation of theirs / √k, checked
against the members run on their own, through ONNX, under a student, and on input it must refuse."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from asymsearch.cli.main import main
from asymsearch.core.errors import UserError
from asymsearch.core.ort import OnnxEmbedder
from asymsearch.export.onnx_export import export_checkpoint
from asymsearch.training.checkpoint import load_checkpoint, model_from_checkpoint, state_dict_id
from asymsearch.training.config import StudentConfig, TeacherConfig
from asymsearch.training.ensemble import ensemble_checkpoints
from asymsearch.training.student import train_student
from asymsearch.training.teacher import train_teacher


@pytest.fixture(scope="module")
def members(image_folder, tmp_path_factory):
    """Two teachers of different backbones and dimensions (same preprocessing), and one at another input size."""
    out = tmp_path_factory.mktemp("members")
    base = dict(data=str(image_folder), image_size=32, epochs=1, lr=1e-2, workers=0, classes_per_batch=4,
                val_fraction=0)
    return {name: train_teacher(TeacherConfig(out=str(out / f"{name}.pt"), **{**base, **kw}))
            for name, kw in {"a": dict(backbone="tiny_cnn", dim=8, seed=0),
                             "b": dict(backbone="tiny_cnn_narrow", dim=4, seed=1, head="gem"),
                             "c": dict(backbone="tiny_cnn_narrow", dim=4, seed=2, image_size=40)}.items()}


@pytest.fixture(scope="module")
def ensemble(members, tmp_path_factory):
    return ensemble_checkpoints([members["a"], members["b"]], tmp_path_factory.mktemp("ens") / "ens.pt")


def test_ensemble_embeds_the_members_concatenated_over_sqrt_k(members, ensemble):
    ckpt = load_checkpoint(ensemble)
    a, b = (model_from_checkpoint(load_checkpoint(members[m])) for m in "ab")
    joined = model_from_checkpoint(ckpt)
    x, y = torch.rand(3, 3, 32, 32), torch.rand(2, 3, 44, 36)  # any input size, like every teacher
    with torch.no_grad():
        for images in (x, y):
            ea, eb, e = a(images), b(images), joined(images)
            assert e.shape == (len(images), 12)
            assert torch.allclose(e, torch.cat([ea, eb], 1) / math.sqrt(2), atol=1e-6)
            assert torch.allclose(e.norm(dim=1), torch.ones(len(images)), atol=1e-5)
        # its inner product is the members' mean cosine similarity, pair by pair
        ea, eb, e = a(x), b(x), joined(x)
        for i in range(3):
            for j in range(3):
                mean_cos = (float(ea[i] @ ea[j]) + float(eb[i] @ eb[j])) / 2
                assert float(e[i] @ e[j]) == pytest.approx(mean_cos, abs=1e-5)
    assert ckpt["role"] == "teacher" and ckpt["teacher_id"] == ckpt["model_id"] == state_dict_id(ckpt["state_dict"])
    member_ckpts = [load_checkpoint(members[m]) for m in "ab"]
    assert ckpt["model_id"] not in {m["model_id"] for m in member_ckpts}
    assert ckpt["arch"]["dim"] == 12 and [m["backbone"] for m in ckpt["arch"]["members"]] == ["tiny_cnn",
                                                                                             "tiny_cnn_narrow"]
    assert [m["model_id"] for m in ckpt["config"]["ensemble"]] == [m["model_id"] for m in member_ckpts]
    assert ckpt["preprocessing"] == member_ckpts[0]["preprocessing"]
    # members record what they started from, but rebuilding the ensemble never loads (or downloads) those weights
    elsewhere = {**ckpt, "arch": {**ckpt["arch"], "members": [{**m, "pretrained": "/nowhere/weights.pt"}
                                                              for m in ckpt["arch"]["members"]]}}
    assert torch.equal(model_from_checkpoint(elsewhere)(x), e)


def test_ensemble_exports_and_onnxruntime_matches_torch(ensemble, tmp_path):
    manifest = export_checkpoint(ensemble, tmp_path / "ens.onnx")
    assert manifest.dim == 12 and len(manifest.architecture["members"]) == 2
    embedder = OnnxEmbedder(tmp_path / "ens.onnx")
    model = model_from_checkpoint(load_checkpoint(ensemble))
    rng = np.random.default_rng(5)
    for h, w in ((32, 32), (40, 56)):
        batch = rng.normal(size=(2, 3, h, w)).astype(np.float32)
        with torch.no_grad():
            expected = model(torch.from_numpy(batch)).numpy()
        np.testing.assert_allclose(embedder.session.run(None, {embedder.input_name: batch})[0], expected, atol=1e-5)


def test_a_student_trains_into_the_ensembles_space(ensemble, image_folder, tmp_path):
    path = train_student(StudentConfig(data=str(image_folder), teacher=str(ensemble), out=str(tmp_path / "s.pt"),
                                       backbone="tiny_cnn_narrow", epochs=1, batch_size=16, workers=0,
                                       image_size=24))
    student, teacher = load_checkpoint(path), load_checkpoint(ensemble)
    assert student["teacher_id"] == teacher["model_id"] and student["arch"]["dim"] == 12
    assert model_from_checkpoint(student)(torch.rand(2, 3, 24, 24)).shape == (2, 12)
    with pytest.raises(UserError, match="is an ensemble of 2"):
        train_student(StudentConfig(data=str(image_folder), teacher=str(ensemble), out=str(tmp_path / "f.pt"),
                                    backbone="tiny_cnn", from_teacher=True, workers=0))


def test_ensemble_refuses_what_cannot_be_joined(members, ensemble, tmp_path, capsys):
    a, b, c = members["a"], members["b"], members["c"]
    out = tmp_path / "e.pt"
    with pytest.raises(UserError, match="differs from .* in preprocessing .* of one preprocessing"):
        ensemble_checkpoints([a, c], out)
    with pytest.raises(UserError, match="already an ensemble: give its members"):
        ensemble_checkpoints([ensemble, a], out)
    with pytest.raises(UserError, match="the same model appears twice"):
        ensemble_checkpoints([a, b, a], out)
    with pytest.raises(UserError, match="at least 2"):
        ensemble_checkpoints([a], out)
    student = load_checkpoint(a)
    torch.save({**student, "role": "student", "teacher_id": "someone"}, tmp_path / "s.pt")
    with pytest.raises(UserError, match="is a student: an ensemble joins teachers"):
        ensemble_checkpoints([a, tmp_path / "s.pt"], out)
    assert main(["train", "ensemble", "--out", str(out), str(a), str(c)]) == 2
    err = capsys.readouterr().err.strip()
    assert "in preprocessing" in err and len(err.splitlines()) == 1 and not out.exists()


@pytest.fixture(scope="module")
def member_students(members, image_folder, tmp_path_factory):
    """A --from-teacher student of each member (a: tiny_cnn, b: tiny_cnn_narrow), both at 24 px."""
    out = tmp_path_factory.mktemp("students")
    return {m: train_student(StudentConfig(data=str(image_folder), teacher=str(members[m]), out=str(out / f"s{m}.pt"),
                                           backbone=backbone, from_teacher=True, epochs=1, batch_size=16, workers=0,
                                           image_size=24, val_fraction=0))
            for m, backbone in (("a", "tiny_cnn"), ("b", "tiny_cnn_narrow"))}


def test_joined_students_search_each_members_part_of_the_database(members, ensemble, member_students, image_folder,
                                                                   tmp_path):
    path = ensemble_checkpoints([member_students["a"], member_students["b"]], tmp_path / "joined.pt",
                                teacher=ensemble)
    joined, teacher = load_checkpoint(path), load_checkpoint(ensemble)
    assert joined["role"] == "student" and joined["teacher_id"] == teacher["model_id"] and joined["arch"]["dim"] == 12
    fa, fb = (model_from_checkpoint(load_checkpoint(member_students[m])) for m in "ab")
    ga, gb = (model_from_checkpoint(load_checkpoint(members[m])) for m in "ab")
    f, e = model_from_checkpoint(joined), model_from_checkpoint(teacher)
    q, d = torch.rand(3, 3, 24, 24), torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        scores = f(q) @ e(d).T
        for i in range(3):
            for j in range(4):  # each student against its own teacher's embedding of the database image
                own = (float(fa(q[i:i + 1])[0] @ ga(d[j:j + 1])[0]) + float(fb(q[i:i + 1])[0] @ gb(d[j:j + 1])[0])) / 2
                assert float(scores[i, j]) == pytest.approx(own, abs=1e-5)
    # exported, the joined student pairs with the exported ensemble (same teacher id), not with a member alone
    from asymsearch.core.errors import PairingError
    from asymsearch.index.evaluate import evaluate_pair
    for name, ckpt in (("joined", path), ("ens", ensemble), ("a", members["a"])):
        export_checkpoint(ckpt, tmp_path / f"{name}.onnx")
    evaluate_pair(image_folder, tmp_path / "joined.onnx", tmp_path / "ens.onnx", progress=False)
    with pytest.raises(PairingError, match="not comparable"):
        evaluate_pair(image_folder, tmp_path / "joined.onnx", tmp_path / "a.onnx", progress=False)


def test_joining_students_refuses_what_does_not_fit(members, ensemble, member_students, tmp_path, capsys):
    sa, sb, out = member_students["a"], member_students["b"], tmp_path / "j.pt"
    with pytest.raises(UserError, match="student 1 must be a student of member 1"):
        ensemble_checkpoints([sb, sa], out, teacher=ensemble)
    with pytest.raises(UserError, match="has 2 members; give one student of each"):
        ensemble_checkpoints([sa, sb, _renamed(sa, tmp_path / "sa2.pt")], out, teacher=ensemble)
    stranger = _renamed(sa, tmp_path / "stranger.pt", teacher_id="0123456789abcdef")
    with pytest.raises(UserError, match="which is no member of"):
        ensemble_checkpoints([stranger, sb], out, teacher=ensemble)
    with pytest.raises(UserError, match="is not an ensemble teacher"):
        ensemble_checkpoints([sa, sb], out, teacher=members["a"])
    with pytest.raises(UserError, match="is a teacher: an ensemble joins students of that ensemble's members"):
        ensemble_checkpoints([members["a"], members["b"]], out, teacher=ensemble)
    assert main(["train", "ensemble", "--out", str(out), str(sa), str(sb)]) == 2
    err = capsys.readouterr().err.strip()
    assert "give --teacher ENSEMBLE.pt" in err and len(err.splitlines()) == 1 and not out.exists()


def _renamed(path, to, **changes):
    """A copy of checkpoint `path` with another model id (so it counts as a distinct model) and `changes`."""
    ckpt = load_checkpoint(path)
    torch.save({**ckpt, "model_id": "f" * 16, **changes}, to)
    return to
