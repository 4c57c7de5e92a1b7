"""`train teacher --init-seed` and `train soup`: members that share a start, averaged weight by weight."""
from __future__ import annotations

import pytest
import torch

from asymsearch.cli.main import main
from asymsearch.core.errors import UserError
from asymsearch.training.checkpoint import load_checkpoint, model_from_checkpoint, state_dict_id
from asymsearch.training.config import TeacherConfig
from asymsearch.training.soup import average_checkpoints
from asymsearch.training import proxies as proxies_module
from asymsearch.training.teacher import train_teacher


def teacher(data, out, **kw):
    base = dict(backbone="tiny_cnn_narrow", dim=8, image_size=32, epochs=1, lr=1e-2, workers=0, classes_per_batch=4,
                val_fraction=0)
    return load_checkpoint(train_teacher(TeacherConfig(data=str(data), out=str(out), **{**base, **kw})))


def test_init_seed_fixes_the_start_and_seed_the_rest(image_folder, tmp_path, monkeypatch):
    untrained = {s: teacher(image_folder, tmp_path / f"u{s}.pt", epochs=0, **s_kw)["state_dict"]
                 for s, s_kw in {"0": {"seed": 0}, "1/0": {"seed": 1, "init_seed": 0}, "1": {"seed": 1}}.items()}
    assert state_dict_id(untrained["1/0"]) == state_dict_id(untrained["0"])  # the start of seed 0
    assert state_dict_id(untrained["1"]) != state_dict_id(untrained["0"])
    trained = [teacher(image_folder, tmp_path / f"t{s}.pt", seed=s, init_seed=0)["state_dict"] for s in (0, 1)]
    assert not torch.equal(trained[0]["head.proj.weight"], trained[1]["head.proj.weight"])  # batches differ
    again = teacher(image_folder, tmp_path / "t0b.pt", seed=0, init_seed=0)["state_dict"]
    assert state_dict_id(again) == state_dict_id(trained[0])  # init_seed = seed: the run of seed alone
    proxies = []  # Proxy-Anchor's proxies as each run draws them: part of the start
    real = proxies_module.ProxyAnchorLoss

    def record(*a, **kw):
        proxies.append(real(*a, **kw))
        proxies[-1].initial = proxies[-1].proxies.detach().clone()
        return proxies[-1]

    monkeypatch.setattr(proxies_module, "ProxyAnchorLoss", record)  # what the loss registry builds
    for seed, init in ((0, None), (1, 0), (1, None)):
        teacher(image_folder, tmp_path / f"p{seed}.pt", seed=seed, init_seed=init, loss="proxy-anchor")
    assert torch.equal(proxies[0].initial, proxies[1].initial) and not torch.equal(proxies[0].initial,
                                                                                   proxies[2].initial)


def test_soup_is_the_mean_of_its_members_and_a_whole_model(image_folder, tmp_path):
    paths = [tmp_path / f"m{s}.pt" for s in (3, 4, 5)]
    members = [teacher(image_folder, p, seed=s, init_seed=7, lr=3e-2) for p, s in zip(paths, (3, 4, 5))]
    soup = load_checkpoint(average_checkpoints(paths, tmp_path / "soup.pt"))
    for key, value in soup["state_dict"].items():
        a, b, c = (m["state_dict"][key] for m in members)
        if value.is_floating_point():
            assert value.dtype == a.dtype and torch.allclose(value.double(), (a.double() + b.double() + c.double()) / 3,
                                                             atol=1e-7), key
        else:  # counters: the first member's
            assert torch.equal(value, a), key
    assert soup["role"] == "teacher" and soup["teacher_id"] == soup["model_id"] == state_dict_id(soup["state_dict"])
    assert soup["model_id"] not in {m["model_id"] for m in members}
    assert [m["seed"] for m in soup["config"]["soup"]] == [3, 4, 5] and soup["config"]["init_seed"] == 7
    x = torch.rand(2, 3, 32, 32)
    y = model_from_checkpoint(soup)(x)
    assert y.shape == (2, 8) and torch.allclose(y.norm(dim=1), torch.ones(2), atol=1e-5)


def test_soup_refuses_members_that_cannot_be_averaged(image_folder, tmp_path, capsys):
    a = tmp_path / "a.pt"
    teacher(image_folder, a, seed=0)
    teacher(image_folder, tmp_path / "b.pt", seed=1)  # another random start of the head
    teacher(image_folder, tmp_path / "c.pt", seed=1, init_seed=0, dim=4)
    with pytest.raises(UserError, match="same --init-seed"):
        average_checkpoints([a, tmp_path / "b.pt"], tmp_path / "s.pt")
    with pytest.raises(UserError, match="differs .* in arch"):
        average_checkpoints([a, tmp_path / "c.pt"], tmp_path / "s.pt")
    student = load_checkpoint(a)
    torch.save({**student, "role": "student", "teacher_id": student["model_id"]}, tmp_path / "s0.pt")
    with pytest.raises(UserError, match="is a student: a soup averages teachers"):
        average_checkpoints([a, tmp_path / "s0.pt"], tmp_path / "s.pt")
    with pytest.raises(UserError, match="at least 2"):
        average_checkpoints([a], tmp_path / "s.pt")
    assert main(["train", "soup", "--out", str(tmp_path / "s.pt"), str(a), str(tmp_path / "b.pt")]) == 2
    assert "same --init-seed" in capsys.readouterr().err and not (tmp_path / "s.pt").exists()
