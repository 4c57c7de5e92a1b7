"""DDP on the CPU (training.distributed): two gloo processes against one process on the same global batches.

The reference is a plain single-process loop (the ordinary `MPerClassSampler`, the losses called on the whole
batch, one backward) that uses nothing from `training.distributed`. The two ranks run the same steps through
`DistContext`: their share of each batch from `DistributedMPerClassSampler`, the model in DistributedDataParallel,
the embeddings gathered before the loss, the proxies' gradients synchronised. Losses, gradients and the weights
after a few SGD steps must match the reference to float tolerance, for the teacher objectives (Proxy-Anchor;
multi-similarity with mined negatives and a cross-batch memory) and the student ones (regression onto the
teacher's embeddings; asymmetric contrastive with negatives mined among them).

Both ranks run every objective in one spawn (module fixture), so the test pays torch's start-up once.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from asymsearch.core.errors import UserError
from asymsearch.training.data import MPerClassSampler
from asymsearch.cli import cmd_train
from asymsearch.cli.main import build_parser, main
from asymsearch.cli.options import config_from_args
from asymsearch.training.checkpoint import load_checkpoint
from asymsearch.training.config import StudentConfig, TeacherConfig
from asymsearch.training.distributed import (DistContext, DistributedMPerClassSampler, check_batch_divides,
                                             check_launch, launch_info)
from asymsearch.training.losses import ContrastiveLoss, MultiSimilarityLoss, RegressionLoss
from asymsearch.training.mining import HardNegativeMiner
from asymsearch.training.proxies import ProxyAnchorLoss
from asymsearch.training.xbm import CrossBatchMemory, xbm_loss

WORLD = 2
CLASSES, PER_CLASS_IMAGES, IN_DIM, DIM = 6, 8, 8, 6
M, CLASSES_PER_BATCH = 2, 4  # global batch 8, 4 per rank (two whole classes each)
STEPS = 3
OBJECTIVES = ("proxy-anchor", "ms-xbm", "student-reg", "student-contr")
RANK_TIMEOUT_S = 120  # the whole spawn; a collective waits at most COLLECTIVE_TIMEOUT_S
COLLECTIVE_TIMEOUT_S = 60


def _data():
    g = torch.Generator().manual_seed(7)
    labels = torch.arange(CLASSES).repeat_interleave(PER_CLASS_IMAGES)
    x = torch.randn(len(labels), IN_DIM, generator=g) + 0.8 * torch.randn(CLASSES, IN_DIM, generator=g)[labels]
    teacher_pool = F.normalize(torch.randn(len(labels), DIM, generator=g), dim=1)  # g(x) of every "image"
    return x, labels, teacher_pool


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(IN_DIM, 16), nn.Tanh(), nn.Linear(16, DIM))

    def forward(self, x):
        return F.normalize(self.body(x), dim=1)


def _steps(objective: str, ctx: DistContext | None) -> dict:
    """STEPS SGD steps of `objective`; ctx None: the single-process reference (no process group, no gather).
    Returns the loss, the gradients of model and proxies at each step, and the final weights."""
    from asymsearch.training.student import StudentObjective  # imported here: only the student objectives need it

    x, labels, teacher_pool = _data()
    torch.manual_seed(0)
    model = _Net()
    proxies = ProxyAnchorLoss(CLASSES, DIM) if objective == "proxy-anchor" else None
    if ctx is None:
        sampler = MPerClassSampler(labels.tolist(), M, CLASSES_PER_BATCH, seed=3)
        net, gather, gather_ids = model, (lambda t: t), (lambda t: t)
    else:
        sampler = ctx.batch_sampler(labels.tolist(), M, CLASSES_PER_BATCH, seed=3)
        net, gather, gather_ids = ctx.wrap(model), ctx.gather, ctx.all_gather
        ctx.broadcast_module(proxies)
    params = list(model.parameters()) + (list(proxies.parameters()) if proxies is not None else [])
    optimizer = torch.optim.SGD(params, lr=0.5)
    memory = CrossBatchMemory(12, DIM)
    ms, miner = MultiSimilarityLoss(), HardNegativeMiner(3)
    student = {"student-reg": StudentObjective("reg", RegressionLoss(), asymmetric=True, num_negatives=3),
               "student-contr": StudentObjective("contr", ContrastiveLoss(0.3), asymmetric=True, num_negatives=3)}
    out = {"loss": [], "grads": [], "batches": []}
    sampler.set_epoch(1)
    for step, batch in enumerate(sampler):
        if step == STEPS:
            break
        idx = torch.as_tensor(batch)
        emb = net(x[idx])
        emb_all, labels_all, idx_all = gather(emb), gather_ids(labels[idx]), gather_ids(idx)
        if objective == "proxy-anchor":
            loss = proxies(emb_all, labels_all)
        elif objective == "ms-xbm":
            loss = ms(emb_all, labels_all, miner(emb_all, labels_all)) + 0.5 * xbm_loss(ms, miner, emb_all,
                                                                                          labels_all, memory)
        else:
            loss = student[objective](emb_all, labels_all, idx_all, teacher_pool, labels)
        optimizer.zero_grad()
        loss.backward()
        if ctx is not None:
            ctx.sync_gradients(proxies)
        out["loss"].append(loss.item())
        out["grads"].append([p.grad.detach().clone() for p in params])
        out["batches"].append(idx_all.tolist())
        optimizer.step()
        memory.enqueue(emb_all.detach(), labels_all)
    out["weights"] = [p.detach().clone() for p in params]
    return out


def _rank_main(rank: int, port: int, folder: str) -> None:
    """One rank: torchrun's variables, the context, every objective; results (or the traceback) to `folder`."""
    try:
        os.environ.update({"WORLD_SIZE": str(WORLD), "RANK": str(rank), "LOCAL_RANK": str(rank),
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        torch.set_num_threads(1)
        ctx = DistContext.from_env("cpu", timeout_s=COLLECTIVE_TIMEOUT_S)
        try:
            results = {"context": (ctx.rank, ctx.world_size, ctx.backend, ctx.is_main),
                       "broadcast": ctx.broadcast_object({"from": ctx.rank})}
            results.update({name: _steps(name, ctx) for name in OBJECTIVES})
        finally:
            ctx.cleanup()
        torch.save(results, Path(folder) / f"rank{rank}.pt")
    except BaseException:
        (Path(folder) / f"rank{rank}.error").write_text(traceback.format_exc())
        raise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(target, folder: Path, timeout_s: float = RANK_TIMEOUT_S) -> None:
    """Start WORLD spawned processes `target(rank, port, folder)`; wait at most `timeout_s`, stop them all as
    soon as one fails, and fail with the first traceback a rank wrote."""
    spawn = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [spawn.Process(target=target, args=(r, port, str(folder)), daemon=True) for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    try:
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            if any(p.exitcode not in (None, 0) for p in procs):
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(5)
    errors = sorted(folder.glob("rank*.error"))
    if errors:
        pytest.fail(f"{errors[0].name}:\n{errors[0].read_text()}")
    codes = [p.exitcode for p in procs]
    assert codes == [0] * WORLD, f"ranks exited with {codes} (timeout {timeout_s} s: negative = killed)"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("ddp")
    run_ranks(_rank_main, folder)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def reference() -> dict:
    return {name: _steps(name, None) for name in OBJECTIVES}


def test_ranks_joined_one_gloo_group(ranks):
    assert [r["context"] for r in ranks] == [(0, WORLD, "gloo", True), (1, WORLD, "gloo", False)]
    assert [r["broadcast"] for r in ranks] == [{"from": 0}] * WORLD  # what rank 0 alone measured, on every rank


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_two_processes_match_one_on_the_same_global_batch(ranks, reference, objective):
    ref = reference[objective]
    assert len(ref["loss"]) == STEPS
    for rank in ranks:
        got = rank[objective]
        assert got["batches"] == ref["batches"]  # the gathered global batch is the single-process batch, in order
        np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-5, atol=1e-6)
        for step in range(STEPS):
            for g, g_ref in zip(got["grads"][step], ref["grads"][step], strict=True):
                assert g_ref.abs().max() > 0  # a gradient that is really there (not 0 == 0)
                torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)
        for w, w_ref in zip(got["weights"], ref["weights"], strict=True):
            torch.testing.assert_close(w, w_ref, rtol=1e-4, atol=1e-6)


def test_rank_shares_are_disjoint_and_make_the_single_process_batch():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, size=200).tolist()
    for world, cpb, m in ((2, 4, 3), (3, 3, 2), (4, 2, 4)):  # whole classes per rank, and classes split by ranks
        single = MPerClassSampler(labels, m, cpb, seed=5)
        shards = [DistributedMPerClassSampler(labels, m, cpb, seed=5, rank=r, world_size=world) for r in range(world)]
        for epoch in (0, 4):
            single.set_epoch(epoch)
            for s in shards:
                s.set_epoch(epoch)
            batches = list(single)
            per_rank = [list(s) for s in shards]
            assert all(len(b) == len(batches) == len(s) for b, s in zip(per_rank, shards))
            for i, batch in enumerate(batches):
                parts = [b[i] for b in per_rank]
                assert all(len(p) == len(batch) // world == shards[0].local_batch_size for p in parts)
                assert sum(parts, []) == batch
                # disjoint images: the pools are large enough to be drawn without replacement
                assert len(set(batch)) == len(batch) == len(set().union(*map(set, parts)))
        other_epoch = DistributedMPerClassSampler(labels, m, cpb, seed=5, rank=0, world_size=world)
        other_epoch.set_epoch(1)
        assert list(other_epoch) != per_rank[0]


def test_world_size_that_does_not_divide_the_batch_is_refused_in_one_line():
    with pytest.raises(UserError) as e:
        check_batch_divides(9, 2, "classes_per_batch 3 x per_class 3")
    message = str(e.value)
    assert "\n" not in message and "world size 2" in message and "9" in message and "8 or 10" in message
    check_batch_divides(12, 3, "any")  # divides: no error
    check_batch_divides(9, 1, "any")
    with pytest.raises(UserError, match="world size 2 does not divide the batch of 9"):
        DistributedMPerClassSampler([0, 1, 2] * 10, 3, 3, rank=0, world_size=2)


def test_launch_check_reads_the_world_size_and_the_batch_rule_of_each_config():
    torchrun = {"WORLD_SIZE": "3", "RANK": "2", "LOCAL_RANK": "0"}
    teacher = TeacherConfig(data="d", out="o", classes_per_batch=8, per_class=4)  # 32 images
    with pytest.raises(UserError, match=r"world size 3 does not divide the batch of 32 images \(classes_per_batch 8 x"):
        check_launch(teacher, torchrun)
    assert check_launch(teacher, {**torchrun, "WORLD_SIZE": "4"}).rank == 2
    assert check_launch(teacher, {}).world_size == 1  # no torchrun: one process, any batch
    student = StudentConfig(data="d", teacher="t", out="o", batch_size=30, per_class=4)  # 7 classes x 4 = 28
    with pytest.raises(UserError, match=r"does not divide the batch of 28 images \(batch_size 30: 7 classes"):
        check_launch(student, torchrun)
    check_launch(student, {**torchrun, "WORLD_SIZE": "7"})


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_cli_refuses_a_world_size_that_does_not_divide_the_batch_before_starting(role, tmp_path, monkeypatch,
                                                                                 capsys):
    """One line, exit status 2, no process group joined and nothing read or written (the data folder and the
    teacher do not even exist: the check comes first)."""
    monkeypatch.setenv("WORLD_SIZE", "2"), monkeypatch.setenv("RANK", "0"), monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False), monkeypatch.delenv("MASTER_PORT", raising=False)
    out = tmp_path / "model.pt"
    batch = ["--classes-per-batch", "3", "--per-class", "3"] if role == "teacher" else \
        ["--batch-size", "9", "--per-class", "3", "--teacher", str(tmp_path / "absent.pt")]
    code = main(["train", role, "--data", str(tmp_path / "absent"), "--out", str(out), *batch])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "world size 2 does not divide the batch of 9 images" in err
    assert not torch.distributed.is_initialized() and list(tmp_path.iterdir()) == []


def test_the_launcher_refuses_a_world_size_that_does_not_divide_the_batch_before_any_worker(tmp_path, monkeypatch,
                                                                                         capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(cmd_train.subprocess, "run", lambda *a, **k: pytest.fail("a worker was started"))
    code = main(["train", "teacher", "--data", str(tmp_path / "absent"), "--out", str(tmp_path / "t.pt"),
                 "--nproc-per-node", "2", "--classes-per-batch", "3", "--per-class", "3"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "world size 2 does not divide the batch of 9 images" in err
    assert main(["train", "teacher", "--data", "d", "--out", "o", "--nproc-per-node", "0"]) == 2
    assert "--nproc-per-node must be at least 1" in capsys.readouterr().err


def test_the_workers_get_the_launchers_config_back():
    argv = ["train", "teacher", "--data", "d x", "--out", "o.pt", "--no-amp", "--freeze-bn", "--mean", "0.1", "0.2",
            "0.3", "--lr", "0.003", "--loss", "ms", "--classes-per-batch", "6", "--init-seed", "4"]
    def parsed(argv):  # as main() does: flags over the config layers
        args = build_parser().parse_args(argv)
        args.config_binding.apply(args)
        return config_from_args(TeacherConfig, args)

    cfg = parsed(argv)
    rebuilt = parsed(["train", "teacher", *cmd_train.config_argv(cfg)])
    assert rebuilt == cfg and cfg.amp is False and cfg.mean == (0.1, 0.2, 0.3) and cfg.init_seed == 4


def test_train_teacher_on_two_cpu_processes_end_to_end(image_folder, tmp_path):
    """`asymsearch train teacher --nproc-per-node 2` (torchrun, gloo): one checkpoint, one log, one console report,
    written by rank 0; both ranks trained the same model (DDP), so the checkpoint holds every epoch's history."""
    out = tmp_path / "teacher.pt"
    cmd = [sys.executable, "-m", "asymsearch.cli.main", "train", "teacher", "--nproc-per-node", "2", "--data",
           str(image_folder), "--out", str(out), "--backbone", "tiny_cnn_narrow", "--dim", "8", "--image-size", "32",
           "--epochs", "2", "--lr", "1e-3", "--workers", "0", "--classes-per-batch", "4", "--per-class", "4",
           "--loss", "proxy-anchor", "--val-fraction", "0.25", "--device", "cpu"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("teacher checkpoint:") == 1 and run.stdout.count("teacher epoch 2/2") == 1
    log = [json.loads(line) for line in (tmp_path / "teacher.log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [1, 2]
    ckpt = load_checkpoint(out)
    assert [h["epoch"] for h in ckpt["history"]] == [1, 2] and ckpt["config"]["loss"] == "proxy-anchor"
    assert (tmp_path / "teacher.state.pt").is_file()


def test_train_student_on_two_cpu_processes_end_to_end(image_folder, tmp_path):
    """`asymsearch train student --nproc-per-node 2` against an (untrained) teacher: rank 0 fills the teacher cache
    before the other rank reads it, validates, reports and writes the one checkpoint."""
    from asymsearch.training.teacher import train_teacher

    teacher = train_teacher(TeacherConfig(data=str(image_folder), out=str(tmp_path / "teacher.pt"),
                                          backbone="tiny_cnn_narrow", dim=8, image_size=32, epochs=0, workers=0,
                                          device="cpu"))
    out = tmp_path / "student.pt"
    cmd = [sys.executable, "-m", "asymsearch.cli.main", "train", "student", "--nproc-per-node", "2", "--data",
           str(image_folder), "--teacher", str(teacher), "--out", str(out), "--backbone", "tiny_cnn_narrow",
           "--epochs", "2", "--workers", "0", "--batch-size", "16", "--per-class", "4", "--loss", "contr",
           "--val-fraction", "0.25", "--device", "cpu"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("student checkpoint:") == 1 and run.stdout.count("student epoch 2/2") == 1
    ckpt = load_checkpoint(out)
    assert ckpt["role"] == "student" and ckpt["teacher_id"] == load_checkpoint(teacher)["model_id"]
    assert [h["epoch"] for h in ckpt["history"]] == [1, 2] and all(h["val_recall@1"] is not None
                                                                   for h in ckpt["history"])


def test_without_torchrun_the_context_is_one_process_and_a_no_op(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = DistContext.from_env("cpu")
    assert (ctx.distributed, ctx.is_main, ctx.rank, ctx.world_size) == (False, True, 0, 1)
    x = torch.randn(3, 2, requires_grad=True)
    assert ctx.gather(x) is x and ctx.all_gather(x) is x
    model = nn.Linear(2, 2)
    assert ctx.wrap(model) is model
    ctx.sync_gradients(model), ctx.broadcast_module(model), ctx.barrier(), ctx.cleanup()
    assert launch_info({"WORLD_SIZE": "1"}).world_size == 1


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
    ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"}, "out of range"),
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}, "MASTER_ADDR and MASTER_PORT is not set"),
])
def test_malformed_launch_variables_are_one_line_errors(env, message):
    with pytest.raises(UserError, match=message):
        DistContext.from_env("cpu", env=env)
