"""Ensemble teachers: k trained teachers served as one model whose embedding is the concatenation of theirs.

    e(x) = [g_1(x); g_2(x); ...; g_k(x)] / √k,

each g_i unit-norm, so e(x) is unit-norm too and ⟨e(x), e(y)⟩ = (1/k) Σ_i ⟨g_i(x), g_i(y)⟩: ranking by the
ensemble's inner product is ranking by the members' mean cosine similarity (the concatenated ensemble of deep
metric learning, e.g. Opitz et al., "BIER", ICCV 2017, and Kim et al., "Attention-based ensemble", ECCV 2018).

The asymmetric setting is what makes this affordable: the teacher embeds the database once, offline, so it can
cost k networks. Unlike a model soup (`training.soup`), the members need not share an architecture or a start;
they must be teachers with the same preprocessing, so one prepared image feeds them all. The ensemble is an
ordinary checkpoint (role teacher, `arch["members"]` = the members' architectures), so export, index, eval and
student training need nothing else.

Its queries come from a student of the ensemble's space, made either way:
- one network trained against e (`train student --teacher ensemble.pt`, dimension Σ dim_i), or
- a *joined student*: a student f_i of each member g_i (e.g. `--from-teacher`, a member at a cheaper input
  size), joined in the members' order, f(x) = [f_1(x); ...; f_k(x)] / √k. Block i of f lives in g_i's space, so
  ⟨f(q), e(d)⟩ = (1/k) Σ_i ⟨f_i(q), g_i(d)⟩: each student searches its own teacher's part of the database.
"""
from __future__ import annotations

import os
from pathlib import Path

from asymsearch.core.errors import UserError
from asymsearch.core.manifest import Preprocessing
from asymsearch.training.checkpoint import (load_checkpoint, load_members, make_checkpoint, model_from_checkpoint,
                                           save_checkpoint)
from asymsearch.training.models import EnsembleNet


def ensemble_arch(member_archs: list[dict]) -> dict:
    """The `arch` an ensemble checkpoint records: its members' architectures, in order, and the summed dim."""
    return {"backbone": "ensemble", "head": "concat", "dim": sum(int(a["dim"]) for a in member_archs),
            "pretrained": None, "members": [dict(a) for a in member_archs]}


def _load_joinable(paths: list, role: str) -> list[dict]:
    """At least 2 distinct checkpoints of `role`, none an ensemble, with one preprocessing; else `UserError`."""
    hint = (" (give --teacher ENSEMBLE.pt to join students of its members)" if role == "teacher" else
            " of that ensemble's members (with --teacher)")
    members = load_members(paths, role=role, shared=("preprocessing",), joins="an ensemble joins", hint=hint)
    for path, ckpt in zip(paths, members):
        if "members" in ckpt["arch"]:
            raise UserError(f"{path} is already an ensemble: give its members instead")
    ids = [c["model_id"] for c in members]
    if len(set(ids)) < len(ids):
        raise UserError(f"the same model appears twice: an ensemble joins distinct {role}s")
    return members


def _students_fit(paths: list, students: list[dict], teacher_path, teacher: dict) -> None:
    """Student i must have been trained against member i of the ensemble `teacher`; else `UserError`."""
    if teacher["role"] != "teacher" or "members" not in teacher["arch"]:
        raise UserError(f"{teacher_path} is not an ensemble teacher (made by `asymsearch train ensemble`)")
    wanted = [m["model_id"] for m in teacher["config"]["ensemble"]]
    if len(students) != len(wanted):
        raise UserError(f"{teacher_path} has {len(wanted)} members; give one student of each, in its order "
                        f"(got {len(students)})")
    for i, (path, ckpt) in enumerate(zip(paths, students)):
        if ckpt["teacher_id"] != wanted[i]:
            where = f"member {wanted.index(ckpt['teacher_id']) + 1}" if ckpt["teacher_id"] in wanted else "no member"
            raise UserError(f"{path} is a student of teacher {ckpt['teacher_id']}, which is {where} of "
                            f"{teacher_path}; student {i + 1} must be a student of member {i + 1} ({wanted[i]})")


def ensemble_checkpoints(paths: list[str | os.PathLike], out: str | os.PathLike, *,
                         teacher: str | os.PathLike | None = None) -> Path:
    """Write the ensemble of the checkpoints at `paths` (in that order) to `out` and return its path.

    Without `teacher`: the members are distinct teachers, none itself an ensemble, with one preprocessing; the
    result is a teacher. With `teacher` (an ensemble teacher): member i is a student of the teacher's member i
    (same rules otherwise); the result is a student of `teacher`, in its space. Anything else is a `UserError`
    and nothing is written."""
    role = "teacher" if teacher is None else "student"
    members = _load_joinable(paths, role)
    if teacher is not None:
        ens = load_checkpoint(teacher)
        _students_fit(paths, members, teacher, ens)
    model = EnsembleNet([model_from_checkpoint(c) for c in members]).eval()
    config = {"ensemble": [{"path": str(p), "model_id": c["model_id"], "arch": c["arch"]}
                           for p, c in zip(paths, members)],
              **({"teacher": str(teacher)} if teacher is not None else {})}
    ckpt = make_checkpoint(model, role=role, arch=ensemble_arch([c["arch"] for c in members]),
                           preprocessing=Preprocessing.from_dict(members[0]["preprocessing"]),
                           teacher_id=None if teacher is None else ens["model_id"], config=config)
    return save_checkpoint(ckpt, out)


__all__ = ["EnsembleNet", "ensemble_arch", "ensemble_checkpoints"]
