"""Compatible teacher upgrades (issue 25, item 3): BCT's compatibility term, the vector map and `index transform`,
and the pairing contract for a teacher trained compatible with an old one."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from asymsearch.core.errors import PairingError
from asymsearch.core.manifest import IndexManifest, ModelManifest, Preprocessing, check_pairing
from asymsearch.core.synthetic import make_synthetic_dataset
from asymsearch.index.transform import VectorMap, fit_map

from tests.conftest import make_linear_onnx


# ------------------------------------------------------------------------------------- the compatibility term

def test_influence_loss_matches_the_papers_equation_on_explicit_numbers():
    """L_old = mean_i −log softmax(s · w_old φ_new(x_i))_{y_i}, written out by hand for 3 classes, 2 images."""
    import torch

    from asymsearch.training.compat import InfluenceLoss, regression_loss, synthesized_classifier

    w = [[1.0, 0.0], [0.0, 1.0], [-0.6, 0.8]]
    emb = [[0.6, 0.8], [1.0, 0.0]]
    labels = [2, 0]
    s = 4.0
    expected = 0.0
    for e, y in zip(emb, labels):
        logits = [s * (wc[0] * e[0] + wc[1] * e[1]) for wc in w]
        expected += -logits[y] + math.log(sum(math.exp(z) for z in logits))
    expected /= len(emb)
    got = InfluenceLoss(torch.tensor(w), scale=s)(torch.tensor(emb), torch.tensor(labels))
    assert got.item() == pytest.approx(expected, rel=1e-6)

    old = [[0.0, 1.0], [0.6, 0.8]]
    want_reg = sum(sum((a - b) ** 2 for a, b in zip(e, o)) for e, o in zip(emb, old)) / 2
    assert regression_loss(torch.tensor(emb), torch.tensor(old)).item() == pytest.approx(want_reg, rel=1e-6)

    # the synthesised classifier: the normalised class means of the old embeddings
    old_emb = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [0.0, 3.0]], np.float32)
    got_w = synthesized_classifier(old_emb, [0, 0, 1, 1], 2).numpy()
    np.testing.assert_allclose(got_w, [[1 / math.sqrt(2), 1 / math.sqrt(2)], [0.0, 1.0]], atol=1e-6)


def test_compatibility_term_adds_both_weighted_terms_on_the_batch_rows():
    import torch

    from asymsearch.training.compat import CompatibilityTerm, InfluenceLoss, synthesized_classifier
    from asymsearch.training.engine import Step

    rng = np.random.default_rng(0)
    old = rng.normal(size=(12, 4)).astype(np.float32)
    old /= np.linalg.norm(old, axis=1, keepdims=True)
    labels = [i % 3 for i in range(12)]
    term = CompatibilityTerm(old, labels, 3, weight=0.5, regression=2.0, scale=8.0)
    emb = torch.nn.functional.normalize(torch.randn(4, 4), dim=1)
    idx = torch.tensor([1, 5, 7, 10])
    y = torch.tensor([labels[i] for i in idx])
    got = term.loss_term(Step(emb=emb, labels=y, idx=idx)).item()
    influence = InfluenceLoss(synthesized_classifier(old, labels, 3), 8.0)(emb, y).item()
    reg = float(np.mean([np.sum((emb[j].numpy() - old[i]) ** 2) for j, i in enumerate(idx.tolist())]))
    assert got == pytest.approx(0.5 * influence + 2.0 * reg, rel=1e-5)


def test_compatible_teacher_records_the_old_id_through_export_and_its_student_pairs_with_the_old_index(
        image_folder, tmp_path):
    """train teacher --compatible-with OLD.onnx -> export records compatible_with; a student of it pairs with an
    index OLD embedded, a student of an unconstrained new teacher is refused with the plain message."""
    from asymsearch.export.onnx_export import export_checkpoint
    from asymsearch.training.config import StudentConfig, TeacherConfig
    from asymsearch.training.student import train_student
    from asymsearch.training.teacher import train_teacher

    base = dict(backbone="tiny_cnn_narrow", classes="all", dim=8, image_size=32, epochs=1, lr=1e-3, workers=0,
                classes_per_batch=4, val_fraction=0, trunk_cache=str(tmp_path / "trunk"))
    old_pt = train_teacher(TeacherConfig(data=str(image_folder), out=str(tmp_path / "old.pt"), seed=0, **base))
    old = export_checkpoint(old_pt, tmp_path / "old.onnx")
    assert "compatible_with" not in old.extra
    new_pt = train_teacher(TeacherConfig(data=str(image_folder), out=str(tmp_path / "new.pt"), seed=1,
                                         compatible_with=str(tmp_path / "old.onnx"), compat_regression=1.0, **base))
    plain_pt = train_teacher(TeacherConfig(data=str(image_folder), out=str(tmp_path / "plain.pt"), seed=1, **base))
    new = export_checkpoint(new_pt, tmp_path / "new.onnx")
    assert new.extra["compatible_with"] == [old.teacher_id] and new.teacher_id != old.teacher_id
    students = {}
    for name, teacher in (("compat", new_pt), ("plain", plain_pt)):
        st = train_student(StudentConfig(data=str(image_folder), teacher=str(teacher),
                                         out=str(tmp_path / f"{name}_s.pt"),
                                         backbone="tiny_cnn_narrow", classes="all", epochs=1, workers=0,
                                         batch_size=16, val_fraction=0, cache_dir=str(tmp_path / "tc")))
        students[name] = export_checkpoint(st, tmp_path / f"{name}_s.onnx")
    old_index = IndexManifest(teacher_id=old.teacher_id, dim=8, metric="inner_product", factory="Flat", count=1,
                              teacher_model={}, build={})
    assert students["compat"].extra["compatible_with"] == [old.teacher_id]
    check_pairing(students["compat"], old_index)  # compatible: pairs
    with pytest.raises(PairingError, match="their embeddings are not comparable"):
        check_pairing(students["plain"], old_index)


def test_compatible_with_refuses_another_dimension_a_student_and_an_index_whose_teacher_is_gone(image_folder,
                                                                                                   tmp_path):
    from asymsearch.core.data import list_image_folder
    from asymsearch.core.errors import UserError
    from asymsearch.index.build import build_index
    from asymsearch.training.compat import old_embeddings

    rng = np.random.default_rng(0)
    items = list_image_folder(image_folder)[:6]
    w = rng.normal(size=(48, 16))
    teacher = make_linear_onnx(tmp_path / "old.onnx", role="teacher", teacher_id="old", weight=w)
    student = make_linear_onnx(tmp_path / "st.onnx", role="student", teacher_id="old", weight=w)
    with pytest.raises(UserError, match="embeds into 16 dimensions and the new one into 8"):
        old_embeddings(teacher, items, tmp_path / "c", dim=8)
    with pytest.raises(PairingError, match="not a teacher"):
        old_embeddings(student, items, tmp_path / "c", dim=16)
    # through an index: the teacher file it names is used, and its absence is one clear line
    build_index(teacher, image_folder, tmp_path / "idx", progress=False)
    got, old_id = old_embeddings(tmp_path / "idx", items, tmp_path / "c", dim=16)
    assert old_id == "old" and got.shape == (6, 16)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    (tmp_path / "old.onnx").unlink()
    with pytest.raises(UserError, match="is not there; pass that teacher's .onnx instead"):
        old_embeddings(tmp_path / "idx", items, tmp_path / "c", dim=16)


def _manifest(role, teacher_id, dim=8, compatible=None):
    return ModelManifest(role=role, architecture={}, dim=dim, input_size=32,
                         preprocessing=Preprocessing(resize=32, crop=32), opset=17, sha256="x", teacher_id=teacher_id,
                         model_id=teacher_id if role == "teacher" else f"s-{teacher_id}",
                         extra={"compatible_with": compatible} if compatible else {})


def test_pairing_accepts_a_compatible_student_only_for_the_teacher_it_was_trained_compatible_with():
    old_index = IndexManifest(teacher_id="old", dim=8, metric="inner_product", factory="Flat", count=1,
                              teacher_model={}, build={})
    check_pairing(_manifest("student", "new", compatible=["old"]), old_index)
    check_pairing(_manifest("student", "old"), old_index)  # the plain case is unchanged
    with pytest.raises(PairingError) as plain:
        check_pairing(_manifest("student", "new"), old_index)
    assert str(plain.value) == ("the student belongs to teacher new, but the index was embedded by teacher old: their "
                                "embeddings are not comparable; use a student trained against teacher old, or "
                                "rebuild the index with teacher new")
    with pytest.raises(PairingError, match="not comparable"):
        check_pairing(_manifest("student", "new", compatible=["older"]), old_index)
    with pytest.raises(PairingError, match="16 dimensions"):
        check_pairing(_manifest("student", "new", dim=16, compatible=["old"]), old_index)
    # compatibility runs one way: a student of the old teacher does not search the new teacher's index
    new_index = IndexManifest(teacher_id="new", dim=8, metric="inner_product", factory="Flat", count=1,
                              teacher_model={}, build={})
    with pytest.raises(PairingError):
        check_pairing(_manifest("student", "old"), new_index)


# --------------------------------------------------------------------------------------------------- the map

def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_map_learned_on_pairs_recovers_a_known_map_on_held_out_vectors(kind):
    rng = np.random.default_rng(0)
    old = _unit(rng.normal(size=(2500, 16))).astype(np.float32)
    R = rng.normal(size=(16, 12))
    truth = lambda x: _unit(np.tanh(2 * x @ R) if kind == "mlp" else x @ R)  # noqa: E731 - nonlinear for the MLP
    new = truth(old)
    opts = dict(ridge=1e-4, hidden=128, epochs=30, lr=1e-2)
    m = fit_map(old[:2000], new[:2000], kind, **opts)
    held = old[2000:]
    cos = np.sum(m(held) * truth(held), axis=1)
    assert m.dims == (16, 12) and np.allclose(np.linalg.norm(m(held), axis=1), 1, atol=1e-5)
    assert cos.mean() > 0.99
    # the same fit on pairs whose rows do not belong together learns nothing: the check above can fail
    shuffled = fit_map(old[:2000], new[rng.permutation(2000)], kind, **opts)
    assert np.sum(shuffled(held) * truth(held), axis=1).mean() < 0.7
    if kind == "mlp":  # the nonlinear map is beyond the linear one (so the MLP's hidden layer did the work)
        lin = fit_map(old[:2000], new[:2000], "linear", ridge=1e-4)
        assert np.sum(lin(held) * truth(held), axis=1).mean() < 0.96


def test_map_round_trips_through_its_file(tmp_path):
    rng = np.random.default_rng(1)
    old, new = rng.normal(size=(50, 6)), rng.normal(size=(50, 4))
    m = fit_map(old, new, "mlp", hidden=8, epochs=2, fit_info={"old_teacher_id": "a"})
    m.save(tmp_path / "m.npz")
    back = VectorMap.load(tmp_path / "m.npz")
    np.testing.assert_array_equal(back(old), m(old))
    assert back.fit["old_teacher_id"] == "a" and back.kind == "mlp"


# ------------------------------------------------------------------------------------------ index transform

@pytest.fixture
def upgrade(tmp_path, image_folder):
    """An old and a new linear teacher whose spaces are related by a known map: new = normalise(old · R)."""
    rng = np.random.default_rng(3)
    w_old = rng.normal(size=(48, 16))
    R = rng.normal(size=(16, 12))
    old = make_linear_onnx(tmp_path / "old.onnx", role="teacher", teacher_id="old-teacher", weight=w_old)
    new = make_linear_onnx(tmp_path / "new.onnx", role="teacher", teacher_id="new-teacher", weight=w_old @ R)
    db = tmp_path / "db"
    shutil.copytree(image_folder, db)
    sample = make_synthetic_dataset(tmp_path / "sample", num_classes=6, per_class=12, size=48, seed=7)
    return {"old": old, "new": new, "R": R, "db": db, "sample": sample, "tmp": tmp_path}


def _vectors(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    import faiss
    index = faiss.read_index(str(folder / "index.faiss"))
    ids = faiss.vector_to_array(index.id_map).astype(np.int64)
    return ids, faiss.downcast_index(index.index).reconstruct_n(0, index.ntotal)


def test_index_transform_publishes_a_new_version_in_the_new_space_without_reading_an_image(upgrade, capsys):
    from asymsearch.cli.main import main
    from asymsearch.core.ort import OnnxEmbedder
    from asymsearch.core.preprocess import load_and_preprocess
    from asymsearch.index import versions
    from asymsearch.index.build import build_index
    from asymsearch.index.store import SearchIndex

    root = upgrade["tmp"] / "index"
    build_index(upgrade["old"], upgrade["db"], root, versioned=True, progress=False)
    old_folder = versions.resolve_index_folder(root)[0]
    old_ids, old_vectors = _vectors(old_folder)
    # the new teacher's embeddings of three database images, taken before the images go away
    probe = sorted(upgrade["db"].rglob("*.jpg"))[:3]
    new_e = OnnxEmbedder(upgrade["new"])
    probe_q = new_e.embed_arrays(np.stack([load_and_preprocess(p, new_e.manifest.preprocessing) for p in probe]))
    shutil.rmtree(upgrade["db"])  # no database image can be read from here on

    status = main(["index", "transform", "--from", str(root), "--to", str(upgrade["new"]), "--sample",
                   str(upgrade["sample"]), "--ridge", "1e-6", "--json"])
    assert status == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["images_read"] == 0 and summary["teacher_id"] == "new-teacher"
    folder, version = versions.resolve_index_folder(root)
    assert version == "v000002" and versions.list_versions(root) == ["v000001", "v000002"]
    m = IndexManifest.load(folder / "manifest.json")
    assert (m.teacher_id, m.dim, m.count, m.factory) == ("new-teacher", 12, len(old_ids), "Flat")
    assert m.build["provenance"] == "transformed" and m.build["transform"]["from_teacher"] == "old-teacher"
    assert m.build["transform"]["from_version"] == "v000001" and m.build["history"][-1]["op"] == "transform"
    assert m.teacher_model["path"] == str(Path(upgrade["new"]).resolve())
    ids, vectors = _vectors(folder)
    np.testing.assert_array_equal(ids, old_ids)
    truth = _unit(old_vectors @ upgrade["R"])
    cos = np.sum(vectors * truth, axis=1)  # the stored vectors, mapped into the new space
    assert cos.mean() > 0.998 and cos.min() > 0.99
    # the index answers the new teacher's queries: each probe image finds itself first; the old one is untouched
    with SearchIndex.open(root) as index:
        assert index.teacher_id == "new-teacher"
        _, hits = index.search(probe_q, 1)
        assert [index.lookup([int(h)])[0][0] for h in hits[:, 0]] == [str(p) for p in probe]
    assert IndexManifest.load(old_folder / "manifest.json").teacher_id == "old-teacher"
    # the probe set of the quality gate moved with the vectors: new teacher id and dimension, the new index's vectors
    from asymsearch.index.probe import ProbeSet
    probe = ProbeSet.load(folder / "meta.sqlite")
    assert (probe.teacher_id, probe.dim) == ("new-teacher", 12) and len(probe) >= 3
    by_id = dict(zip(ids.tolist(), vectors))
    np.testing.assert_allclose(probe.teacher, np.stack([by_id[i] for i in probe.ids]), atol=1e-5)
    assert ProbeSet.load(old_folder / "meta.sqlite").teacher_id == "old-teacher"

    # the learned map applies to a copy elsewhere (`--map`), into a plain folder
    out = upgrade["tmp"] / "copy"
    assert main(["index", "transform", "--from", str(root / "versions" / "v000001"), "--to", str(upgrade["new"]),
                 "--map", str(folder / "transform.npz"), "--out", str(out)]) == 0
    np.testing.assert_allclose(_vectors(out)[1], vectors, atol=1e-6)


def test_index_transform_refuses_bad_input_in_one_line_and_writes_nothing(upgrade, capsys, tmp_path):
    from asymsearch.cli.main import main
    from asymsearch.index import versions
    from asymsearch.index.build import build_index

    root = upgrade["tmp"] / "index"
    build_index(upgrade["old"], upgrade["db"], root, versioned=True, progress=False)
    before = sorted(p.name for p in root.rglob("*"))
    rng = np.random.default_rng(0)
    wrong_dim = fit_map(rng.normal(size=(40, 8)), rng.normal(size=(40, 12)), "linear")
    wrong_dim.save(tmp_path / "wrong.npz")
    fit_map(rng.normal(size=(40, 16)), rng.normal(size=(40, 12)), "linear").save(tmp_path / "good.npz")
    student = make_linear_onnx(tmp_path / "student.onnx", role="student", teacher_id="new-teacher",
                               weight=rng.normal(size=(48, 12)))
    cases = [
        (["--map", str(tmp_path / "wrong.npz")], "takes 8-dimensional vectors but"),
        (["--map", str(tmp_path / "wrong.npz"), "--sample", str(upgrade["sample"])], "either --sample"),
        (["--sample", str(upgrade["sample"]), "--to", str(student)], "not a teacher"),
        (["--sample", str(upgrade["sample"]), "--to", str(upgrade["old"])], "already embedded by teacher"),
        (["--map", str(tmp_path / "good.npz"), "--out", str(upgrade["sample"])], "already exists"),
    ]
    for extra, message in cases:
        argv = ["index", "transform", "--from", str(root), "--to", str(upgrade["new"]), *extra]
        if "--to" in extra:
            argv = ["index", "transform", "--from", str(root), *extra]
        assert main(argv) == 2, extra
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, (extra, err)
        assert sorted(p.name for p in root.rglob("*")) == before  # nothing written
    assert versions.list_versions(root) == ["v000001"]
    # a good request afterwards still succeeds
    assert main(["index", "transform", "--from", str(root), "--to", str(upgrade["new"]), "--sample",
                 str(upgrade["sample"])]) == 0
    assert versions.list_versions(root) == ["v000001", "v000002"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_ray_transform_writes_the_in_process_transforms_index(upgrade, capsys):
    """`index transform --engine ray` (Ray Data actors mapping the blocks) against the in-process transform and
    against the map's equation applied here; blocks of 16 over 80 vectors: five blocks, the last one short."""
    ray = pytest.importorskip("ray", reason="Ray is the `distributed` extra: pip install 'ray[data]'")
    from asymsearch.cli.main import main
    from asymsearch.index.build import build_index
    from asymsearch.index.transform import transform_index

    src = upgrade["tmp"] / "index"
    build_index(upgrade["old"], upgrade["db"], src, progress=False)
    old_ids, old_vectors = _vectors(src)
    rng = np.random.default_rng(5)
    m = fit_map(rng.normal(size=(64, 16)), rng.normal(size=(64, 12)), "mlp", hidden=32, epochs=5)
    ray.init(num_cpus=2, object_store_memory=80 * 1024 * 1024, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        local, _ = transform_index(src, upgrade["new"], m, out=upgrade["tmp"] / "local", block=16)
        on_ray, _ = transform_index(src, upgrade["new"], m, out=upgrade["tmp"] / "ray", block=16, engine="ray")
        m.save(upgrade["tmp"] / "m.npz")
        assert main(["index", "transform", "--from", str(src), "--to", str(upgrade["new"]), "--map",
                     str(upgrade["tmp"] / "m.npz"), "--engine", "ray", "--out", str(upgrade["tmp"] / "cli"),
                     "--json"]) == 0
    finally:
        ray.shutdown()
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["teacher_id"] == "new-teacher"
    assert on_ray.build["transform"]["engine"] == "ray" and local.build["transform"]["engine"] == "local"
    assert (on_ray.teacher_id, on_ray.count, on_ray.dim) == (local.teacher_id, local.count, local.dim) == (
        "new-teacher", 80, 12)
    # the equation of the map, row by row: normalise(x A + b + relu(x W1 + b1) W2)
    truth = []
    for x in old_vectors.astype(np.float64):
        y = x @ m.A + m.b + np.maximum(x @ m.W1 + m.b1, 0) @ m.W2
        truth.append(y / np.linalg.norm(y))
    for name in ("ray", "cli", "local"):
        ids, vectors = _vectors(upgrade["tmp"] / name)
        np.testing.assert_array_equal(ids, old_ids)  # same ids in the same order
        np.testing.assert_allclose(vectors, np.array(truth), atol=1e-5)
    np.testing.assert_array_equal(_vectors(upgrade["tmp"] / "ray")[1], _vectors(upgrade["tmp"] / "local")[1])
