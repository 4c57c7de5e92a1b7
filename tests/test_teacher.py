"""Teacher training features: resume continues exactly, the best-validation checkpoint, the epoch log, the
warm-up + cosine schedule, separate learning rates, the cross-batch memory, and clear errors."""
from __future__ import annotations

import json
import math
from collections import deque

import pytest
import torch
from conftest import loop_metrics

from asymsearch.core.errors import UserError
from asymsearch.training.checkpoint import load_checkpoint
from asymsearch.training.common import prepare_data
from asymsearch.training.config import TeacherConfig
from asymsearch.training.data import ImageDataset, eval_transform
from asymsearch.training.losses import ContrastiveLoss, HardNegativeMiner
from asymsearch.training.models import build_model
from asymsearch.training.schedule import parameter_groups, warmup_cosine
from asymsearch.training import teacher as teacher_module
from asymsearch.training.teacher import log_path, state_path, teacher_preprocessing, train_teacher
from asymsearch.training.xbm import CrossBatchMemory, xbm_loss


def cfg(data, out, **kw) -> TeacherConfig:
    base = dict(backbone="tiny_cnn_narrow", classes="all", dim=8, image_size=32, epochs=2, lr=1e-3, workers=0, classes_per_batch=4,
                warmup_epochs=0.5, xbm=16)
    return TeacherConfig(data=str(data), out=str(out), **{**base, **kw})


@pytest.mark.parametrize("loss", [{}, {"loss": "proxy-anchor", "xbm": 0}, {"ema": 0.9}],
                         ids=["contr+xbm", "proxy-anchor", "ema"])
def test_resume_continues_exactly(image_folder, tmp_path, monkeypatch, loss):
    """Model, optimiser, schedule, memory, RNG -- and Proxy-Anchor's proxies, the weight average -- come back from
    the state."""
    whole = load_checkpoint(train_teacher(cfg(image_folder, tmp_path / "whole.pt", epochs=3, **loss)))
    original = teacher_module._save_state

    def save_then_crash(out, cfg_, epoch, *rest):
        original(out, cfg_, epoch, *rest)
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(teacher_module, "_save_state", save_then_crash)
    with pytest.raises(KeyboardInterrupt):  # the interrupted run: its state is saved after epoch 1
        train_teacher(cfg(image_folder, tmp_path / "part.pt", epochs=3, **loss))
    monkeypatch.undo()
    assert not (tmp_path / "part.pt").exists()
    resumed = load_checkpoint(train_teacher(cfg(image_folder, tmp_path / "part.pt", epochs=3, **loss,
                                                resume=str(state_path(tmp_path / "part.pt")))))
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in whole["history"]], rel=1e-5)
    assert resumed["model_id"] == whole["model_id"]


@pytest.mark.parametrize("ema", [0.0, 0.8])
def test_checkpoint_holds_the_best_validation_epoch_and_every_epoch_is_logged(image_folder, tmp_path, ema):
    out = tmp_path / "t.pt"
    ckpt = load_checkpoint(train_teacher(cfg(image_folder, out, epochs=3, lr=3e-3, ema=ema)))
    recalls = [h["val_recall@1"] for h in ckpt["history"]]
    best = max(range(3), key=lambda i: (recalls[i], -i)) + 1  # first epoch reaching the maximum
    assert ckpt["config"]["best_epoch"] == best
    state = torch.load(state_path(out), weights_only=False)
    assert all(torch.equal(ckpt["state_dict"][k], v) for k, v in state["best_state"].items())
    lines = [json.loads(line) for line in log_path(out).read_text().splitlines()]
    assert [e["epoch"] for e in lines] == [1, 2, 3]
    assert all(e["images_per_s"] > 0 for e in lines)
    assert all(len(e["lr"]) == 2 and e["lr"][0] == e["lr"][1] for e in lines)  # no pretrained weights: one LR
    # the logged validation mAP is the last epoch's model's (the state's; with ema its averaged weights),
    # recomputed here one query at a time
    c = cfg(image_folder, out, epochs=3, lr=3e-3, ema=ema)
    _, val_items, class_to_idx = prepare_data(c.data, c.classes, c.val_fraction)
    model = build_model(ckpt["arch"])
    if ema:
        model.load_state_dict({k.removeprefix("module."): v for k, v in state["ema"].items() if k != "n_averaged"})
        assert not torch.equal(model.state_dict()["head.proj.weight"], state["model"]["head.proj.weight"])
    else:
        model.load_state_dict(state["model"])
    model.eval()
    dataset = ImageDataset(val_items, class_to_idx, eval_transform(teacher_preprocessing(c)))
    with torch.no_grad():
        emb = torch.cat([model(image[None]) for image, _ in dataset]).numpy()
    want = loop_metrics(emb, dataset.labels, emb, dataset.labels, exclude_self=True)
    assert lines[-1]["val_map"] == pytest.approx(want["map"], abs=1e-4)


def test_ema_checkpoint_is_the_moving_average_of_the_weights_after_every_step(image_folder, tmp_path, monkeypatch):
    """With ema=d the checkpoint holds W̄_t = d·W̄_{t-1} + (1 − d)·W_t over the weights after each optimiser step
    (W̄_1 = W_1), recomputed here from the same run's trajectory without ema."""
    decay, models, trajectory = 0.7, [], []
    build = teacher_module.build_model
    monkeypatch.setattr(teacher_module, "build_model", lambda arch: models.append(build(arch)) or models[-1])
    step = torch.optim.AdamW.step

    def step_and_record(self, *a, **kw):
        out = step(self, *a, **kw)
        trajectory.append({k: v.detach().clone() for k, v in models[-1].state_dict().items()})
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step_and_record)
    plain = load_checkpoint(train_teacher(cfg(image_folder, tmp_path / "p.pt", val_fraction=0)))["state_dict"]
    monkeypatch.undo()
    assert len(trajectory) > 4 and all(torch.equal(plain[k], v) for k, v in trajectory[-1].items())
    want = dict(trajectory[0])
    for weights in trajectory[1:]:
        want = {k: decay * want[k] + (1 - decay) * w for k, w in weights.items()}
    got = load_checkpoint(train_teacher(cfg(image_folder, tmp_path / "e.pt", val_fraction=0,
                                            ema=decay)))["state_dict"]
    floats = [k for k, v in got.items() if v.is_floating_point()]
    assert floats and all(torch.allclose(got[k], want[k], atol=1e-6) for k in floats)
    assert not torch.allclose(got["head.proj.weight"], plain["head.proj.weight"], atol=1e-4)
    for bad in (1.0, -0.1):
        with pytest.raises(UserError, match="ema"):
            train_teacher(cfg(image_folder, tmp_path / "b.pt", ema=bad))


def test_resume_refuses_another_config_and_foreign_files(image_folder, tmp_path):
    out = tmp_path / "t.pt"
    train_teacher(cfg(image_folder, out, epochs=1))
    with pytest.raises(UserError, match="differs in lr"):
        train_teacher(cfg(image_folder, out, epochs=1, lr=0.5, resume=str(state_path(out))))
    with pytest.raises(UserError, match="not a teacher training state"):
        train_teacher(cfg(image_folder, out, epochs=2, resume=str(out)))
    with pytest.raises(UserError, match="not found"):
        train_teacher(cfg(image_folder, out, resume=str(tmp_path / "none.pt")))


def test_resume_takes_a_state_saved_before_newer_options_as_their_defaults(image_folder, tmp_path):
    out = tmp_path / "t.pt"
    train_teacher(cfg(image_folder, out, epochs=1))
    path = state_path(out)
    state = torch.load(path, weights_only=False)
    for key in ("trunk_views", "proxy_lr", "addons"):  # options added after the first states were written
        del state["config"][key]
    state["config"]["osm_caa"] = False  # and the add-ons' fields where a state kept them before they were nested
    torch.save(state, path)
    resumed = load_checkpoint(train_teacher(cfg(image_folder, out, epochs=2, resume=str(path))))
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    with pytest.raises(UserError, match="differs in proxy_lr"):
        train_teacher(cfg(image_folder, out, epochs=2, proxy_lr=0.5, resume=str(path)))


def test_resume_never_loads_one_glam_form_into_the_other(image_folder, tmp_path):
    """A state saved before the paper forms became the defaults recorded a plain `glam` for the gate form; both forms
    share parameter names, so only the recorded form tells them apart: such a state resumes as glam:form=gate, and a
    plain (now paper) glam is refused. A state saved now records its form and resumes with the plain spec."""
    out = tmp_path / "t.pt"
    train_teacher(cfg(image_folder, out, epochs=1, head="glam"))
    path = state_path(out)
    state = torch.load(path, weights_only=False)
    assert state["config"]["head"] == "glam:form=paper" and state["head_forms"] == "explicit"
    resumed = load_checkpoint(train_teacher(cfg(image_folder, out, epochs=2, head="glam", resume=str(path))))
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    old = tmp_path / "old.pt"
    train_teacher(cfg(image_folder, old, epochs=1, head="glam:form=gate"))
    state = torch.load(state_path(old), weights_only=False)
    del state["head_forms"]
    state["config"]["head"] = "glam"  # as the gate form was recorded before
    torch.save(state, state_path(old))
    with pytest.raises(UserError, match="differs in head"):
        train_teacher(cfg(image_folder, old, epochs=2, head="glam", resume=str(state_path(old))))
    resumed = load_checkpoint(train_teacher(cfg(image_folder, old, epochs=2, head="glam:form=gate",
                                                resume=str(state_path(old)))))
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]


def test_bad_model_options_fail_before_training(image_folder, tmp_path):
    with pytest.raises(UserError, match="words=3 must divide --dim 8"):
        train_teacher(cfg(image_folder, tmp_path / "t.pt", head="diablo:words=3"))
    with pytest.raises(UserError, match="choose one of"):
        train_teacher(cfg(image_folder, tmp_path / "t.pt", head="netvlad"))
    with pytest.raises(UserError, match="schedule"):
        train_teacher(cfg(image_folder, tmp_path / "t.pt", schedule="step"))
    assert not (tmp_path / "t.pt").exists()


def test_preprocessing_defaults_to_the_backbone():
    spec = teacher_preprocessing(TeacherConfig(data="d", out="o", backbone="efficientnet_lite2"))
    assert (spec.crop, spec.resize, spec.mean, spec.std) == (260, 260, (0.5,) * 3, (0.5,) * 3)
    spec = teacher_preprocessing(TeacherConfig(data="d", out="o", backbone="efficientnet_lite0", image_size=200,
                                               mean=(0.1, 0.2, 0.3), std=(1, 1, 1)))
    assert (spec.crop, spec.mean) == (200, (0.1, 0.2, 0.3))


def test_warmup_cosine_schedule():
    total, warm = 10, 3
    got = [warmup_cosine(s, total, warm) for s in range(total + 1)]
    assert got[:3] == pytest.approx([1 / 4, 2 / 4, 3 / 4])
    assert got[3:] == pytest.approx([0.5 * (1 + math.cos(math.pi * (s - 3) / 7)) for s in range(3, 11)])
    assert warmup_cosine(5, 10, 0, final_fraction=0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))


def test_separate_learning_rate_for_the_new_layers():
    model = build_model({"backbone": "tiny_cnn_narrow", "head": "gem", "dim": 8, "pretrained": None})
    groups = parameter_groups(model, lr=1e-3, backbone_lr=1e-4, weight_decay=0.0)
    by_name = {g["name"]: g for g in groups}
    assert by_name["head"]["lr"] == 1e-3 and by_name["backbone"]["lr"] == 1e-4
    assert {id(p) for p in by_name["head"]["params"]} == {id(p) for p in model.head.parameters()}
    frozen = parameter_groups(model, lr=1e-3, backbone_lr=0.0, weight_decay=0.0)
    assert [g["name"] for g in frozen] == ["head"]
    assert not any(p.requires_grad for p in model.backbone.parameters())


def test_cross_batch_memory_is_a_fifo_of_the_latest_items():
    mem, ref = CrossBatchMemory(5, 2), deque(maxlen=5)
    g = torch.Generator().manual_seed(0)
    for step, n in enumerate([2, 3, 1, 4, 7]):
        emb, labels = torch.randn(n, 2, generator=g), torch.arange(n) + 10 * step
        mem.enqueue(emb, labels)
        ref.extend(zip(emb.tolist(), labels.tolist()))
        got_emb, got_labels = mem.get()
        assert len(mem) == len(ref)
        assert got_labels.tolist() == [lab for _, lab in ref]
        assert torch.allclose(got_emb, torch.tensor([e for e, _ in ref]))


def test_xbm_loss_uses_negatives_mined_from_the_memory():
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(4, 3), dim=1).requires_grad_()
    labels = torch.tensor([0, 0, 1, 1])
    mem = CrossBatchMemory(6, 3)
    assert xbm_loss(ContrastiveLoss(0.5), HardNegativeMiner(2), emb, labels, mem).item() == 0.0
    mem_emb = torch.nn.functional.normalize(torch.randn(6, 3), dim=1)
    mem_labels = torch.tensor([0, 1, 2, 2, 1, 0])
    mem.enqueue(mem_emb, mem_labels)
    loss = xbm_loss(ContrastiveLoss(0.5), HardNegativeMiner(2), emb, labels, mem)
    want = 0.0  # ℓ_C against the memory: every same-label item a positive, the 2 most similar others negatives
    for a in range(4):
        sims = [float(emb.detach()[a] @ mem_emb[j]) for j in range(6)]
        negs = sorted((s for s, lab in zip(sims, mem_labels.tolist()) if lab != labels[a]), reverse=True)[:2]
        want += sum(max(s - 0.5, 0.0) for s in negs) - sum(s for s, lab in zip(sims, mem_labels.tolist())
                                                            if lab == labels[a])
    assert loss.item() == pytest.approx(want / 4, abs=1e-5)
    loss.backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all()


def test_zero_epochs_writes_the_untrained_model(image_folder, tmp_path):
    torch.manual_seed(0)  # what seed=0 gives the model built inside train_teacher
    want = build_model({"backbone": "tiny_cnn_narrow", "head": "gap", "dim": 128, "pretrained": None}).state_dict()
    ckpt = load_checkpoint(train_teacher(cfg(image_folder, tmp_path / "z.pt", epochs=0, head="gap", dim=128)))
    assert ckpt["history"] == [] and ckpt["config"]["best_epoch"] is None and ckpt["arch"]["head"] == "gap"
    assert ckpt["state_dict"].keys() == want.keys()
    assert all(torch.equal(ckpt["state_dict"][k], v) for k, v in want.items())


def test_backbone_lr_zero_freezes_weights_and_batch_norm_statistics(image_folder, tmp_path):
    torch.manual_seed(0)
    want = build_model({"backbone": "tiny_cnn_narrow", "head": "gem", "dim": 8, "pretrained": None}).state_dict()
    ckpt = load_checkpoint(train_teacher(cfg(image_folder, tmp_path / "f.pt", epochs=1, backbone_lr=0.0,
                                             val_fraction=0)))
    backbone = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("backbone.")}
    assert backbone and all(torch.equal(v, want[k]) for k, v in backbone.items())  # incl. running mean/var
    assert not torch.equal(ckpt["state_dict"]["head.proj.weight"], want["head.proj.weight"])


@pytest.mark.parametrize("freeze_bn", [True, False])
def test_freeze_bn_keeps_the_pretrained_statistics_while_the_weights_train(image_folder, tmp_path, freeze_bn):
    torch.manual_seed(0)
    want = build_model({"backbone": "tiny_cnn_narrow", "head": "gem", "dim": 8, "pretrained": None}).state_dict()
    got = load_checkpoint(train_teacher(cfg(image_folder, tmp_path / "b.pt", epochs=1, val_fraction=0,
                                            freeze_bn=freeze_bn)))["state_dict"]
    stats = [k for k in want if k.startswith("backbone.") and k.endswith(("running_mean", "running_var"))]
    weights = [k for k in want if k.startswith("backbone.") and k.endswith("weight")]
    assert stats and weights
    assert all(torch.equal(got[k], want[k]) for k in stats) == freeze_bn
    assert not any(torch.equal(got[k], want[k]) for k in weights)  # conv and batch-norm affine weights train


def test_best_epoch_keeps_the_weights_of_the_best_validation_epoch():
    from asymsearch.training.common import BestEpoch

    net, best, history = torch.nn.Linear(2, 2), BestEpoch(), []
    for epoch, recall in enumerate([0.5, 0.7, 0.7, 0.6], start=1):
        with torch.no_grad():
            net.weight.fill_(epoch)
        history.append({"epoch": epoch, "loss": 0.0, "val_recall@1": recall})
        best.offer(net, history[-1])
    assert best.restore(net, history) == 2  # the first epoch reaching the maximum
    assert torch.all(net.weight == 2) and [bool(h.get("best")) for h in history] == [True, True, False, False]
    unvalidated = BestEpoch()
    for epoch in (1, 2):
        with torch.no_grad():
            net.weight.fill_(10 * epoch)
        unvalidated.offer(net, {"epoch": epoch, "loss": 0.0, "val_recall@1": None})
    assert unvalidated.restore(net, []) is None and torch.all(net.weight == 20)  # the last epoch
    tied, history = BestEpoch(), []  # a saturated Recall@1: the validation mAP decides, then the first epoch
    for epoch, (recall, mean_ap) in enumerate([(0.9, 0.5), (0.99, 0.6), (0.99, 0.7), (0.99, 0.7), (0.98, 0.9)], 1):
        with torch.no_grad():
            net.weight.fill_(epoch)
        history.append({"epoch": epoch, "loss": 0.0, "val_recall@1": recall, "val_map": mean_ap})
        tied.offer(net, history[-1])
    assert tied.restore(net, history) == 3 and torch.all(net.weight == 3)
    resumed = BestEpoch(tied.score, tied.state, history[2]["val_map"])  # as a resumed state rebuilds it
    resumed.offer(net, {"epoch": 6, "loss": 0.0, "val_recall@1": 0.99, "val_map": 0.65})
    assert resumed.tie == 0.7  # a lower mAP at the same Recall@1 does not replace the kept epoch
