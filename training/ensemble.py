"""Ensemble teachers: k trained teachers served as one model whose embedding is the concatenation of theirs.

    e(x) = [g_1(x); g_2(x); ...; g_k(x)] / √k,

each g_i unit-norm, so e(x) is unit-norm too and ⟨e(x), e(y)⟩ = (1/k) Σ_i ⟨g_i(x), g_i(y)⟩: ranking by the
ensemble's inner product is ranking by the members' mean cosine similarity (the concatenated ensemble of deep
metric learning, e.g. Opitz et al., "BIER", ICCV 2017, and Kim et al., "Attention-based ensemble", ECCV 2018).

The asymmetric setting is what makes this affordable: the teacher embeds the database once, offline, so it can
cost k networks, while queries are embedded by one small student trained against e (its dimension is Σ dim_i).
Unlike a model soup (`training.soup`), the members need not share an architecture or a start; they must be
teachers with the same preprocessing, so one prepared image feeds them all. The ensemble is an ordinary
checkpoint (role teacher, `arch["members"]` = the members' architectures), so export, index, eval and student
training need nothing else.
"""
from __future__ import annotations

import os
from pathlib import Path

from asymsearch.core.errors import UserError
from asymsearch.core.manifest import Preprocessing
from asymsearch.training.checkpoint import load_checkpoint, make_checkpoint, model_from_checkpoint, save_checkpoint
from asymsearch.training.models import EnsembleNet


def ensemble_arch(member_archs: list[dict]) -> dict:
    """The `arch` an ensemble checkpoint records: its members' architectures, in order, and the summed dim."""
    return {"backbone": "ensemble", "head": "concat", "dim": sum(int(a["dim"]) for a in member_archs),
            "pretrained": None, "members": [dict(a) for a in member_archs]}


def ensemble_checkpoints(paths: list[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Write the ensemble of the teacher checkpoints at `paths` (in that order) to `out` and return its path.

    The members must be distinct teachers, none itself an ensemble, with one preprocessing; anything else is a
    `UserError` and nothing is written."""
    if len(paths) < 2:
        raise UserError(f"an ensemble joins at least 2 teachers, not {len(paths)}")
    members = [load_checkpoint(p) for p in paths]
    for path, ckpt in zip(paths, members):
        if ckpt["role"] != "teacher":
            raise UserError(f"{path} is a {ckpt['role']}: an ensemble joins teachers (a student embeds queries into "
                            "one teacher's space)")
        if "members" in ckpt["arch"]:
            raise UserError(f"{path} is already an ensemble: give its members instead")
    first = members[0]
    for path, ckpt in zip(paths[1:], members[1:]):
        if ckpt["preprocessing"] != first["preprocessing"]:
            raise UserError(f"{path} prepares images differently from {paths[0]} ({ckpt['preprocessing']} vs "
                            f"{first['preprocessing']}): ensemble members must share one preprocessing")
    ids = [c["model_id"] for c in members]
    if len(set(ids)) < len(ids):
        raise UserError("the same model appears twice: an ensemble joins distinct teachers")
    model = EnsembleNet([model_from_checkpoint(c) for c in members]).eval()
    config = {"ensemble": [{"path": str(p), "model_id": c["model_id"], "arch": c["arch"]}
                           for p, c in zip(paths, members)]}
    ckpt = make_checkpoint(model, role="teacher", arch=ensemble_arch([c["arch"] for c in members]),
                           preprocessing=Preprocessing.from_dict(first["preprocessing"]), config=config)
    return save_checkpoint(ckpt, out)


__all__ = ["EnsembleNet", "ensemble_arch", "ensemble_checkpoints"]
