"""Training checkpoints: the file contract between training, export and the command line.

A checkpoint is a `torch.save`d dict (loadable with `weights_only=True`):

    {"format": 1, "role": "teacher" | "student",
     "arch": {"backbone", "head", "dim", "pretrained"} (an ensemble's also "members": their archs),
     "preprocessing": Preprocessing.to_dict(),
     "state_dict": model.state_dict(),
     "model_id": 16 hex chars, the content id of the state dict (`state_dict_id`),
     "teacher_id": a teacher's own model_id, or the model_id of the teacher a student was trained against,
     "config": the training configuration, "history": [{"epoch", "loss", "val_recall@1"}, ...]}
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from asymsearch.core.errors import UserError
from asymsearch.core.manifest import Preprocessing
from asymsearch.training.heads import explicit_head_spec, recorded_head_spec, translate_head_specs
from asymsearch.training.models import EmbeddingNet, EnsembleNet, build_model

CHECKPOINT_FORMAT = 1
ROLES = ("teacher", "student")
REQUIRED_KEYS = ("format", "role", "arch", "preprocessing", "state_dict", "model_id", "teacher_id", "config",
                 "history")


def state_dict_id(state_dict: dict[str, torch.Tensor]) -> str:
    """Content id: sha256 over (key, dtype, shape, raw bytes) of every tensor in sorted key order; 16 hex chars."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _plain(value: Any) -> Any:
    """Config values as types `torch.load(weights_only=True)` accepts (paths become strings)."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def make_checkpoint(model: EmbeddingNet | EnsembleNet, *, role: str, arch: dict, preprocessing: Preprocessing,
                    teacher_id: str | None = None, config: dict | None = None,
                    history: list[dict] | None = None) -> dict:
    """The checkpoint dict for `model`. A teacher's teacher_id is its own model_id (pass None)."""
    if role not in ROLES:
        raise ValueError(f"role must be 'teacher' or 'student', not {role!r}")
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    model_id = state_dict_id(state)
    if role == "teacher":
        teacher_id = model_id
    elif not teacher_id:
        raise ValueError("a student checkpoint needs its teacher's id")
    return {"format": CHECKPOINT_FORMAT, "role": role,
            "arch": translate_head_specs({"backbone": arch["backbone"], "head": arch["head"], "dim": int(arch["dim"]),
                                          "pretrained": arch.get("pretrained"),
                                          **({"members": [dict(a) for a in arch["members"]]}
                                             if "members" in arch else {})}, explicit_head_spec),
            "preprocessing": preprocessing.to_dict(), "state_dict": state, "model_id": model_id,
            "teacher_id": teacher_id, "config": _plain(config or {}), "history": list(history or [])}


def save_checkpoint(ckpt: dict, path: str | os.PathLike) -> Path:
    """torch.save through a temporary file and a rename; parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read and check a checkpoint; `UserError` if it is missing, unreadable or not an asymsearch checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
        raise UserError(f"cannot read checkpoint {path}: {e.__class__.__name__}: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else 'damaged file'}") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        missing = [k for k in REQUIRED_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
        raise UserError(f"{path} is not an asymsearch checkpoint (missing {', '.join(missing)})")
    if ckpt["format"] != CHECKPOINT_FORMAT:
        raise UserError(f"{path} has checkpoint format {ckpt['format']}; this version reads {CHECKPOINT_FORMAT}")
    if ckpt["role"] not in ROLES:
        raise UserError(f"{path} has unknown role {ckpt['role']!r}")
    # a head spec recorded without its form predates the paper forms as defaults: it names the earlier form
    ckpt["arch"] = translate_head_specs(ckpt["arch"], recorded_head_spec)
    return ckpt


def load_members(paths: list, *, role: str, shared: tuple[str, ...], joins: str, hint: str = "") -> list[dict]:
    """Load the checkpoints a soup or an ensemble is made of: at least 2, all of `role`, agreeing on the `shared`
    fields; else `UserError`. `joins` names the operation in messages ("a soup averages"), `hint` is added to the
    wrong-role one."""
    if len(paths) < 2:
        raise UserError(f"{joins} at least 2 {role}s, not {len(paths)}")
    members = [load_checkpoint(p) for p in paths]
    for path, ckpt in zip(paths, members):
        if ckpt["role"] != role:
            raise UserError(f"{path} is a {ckpt['role']}: {joins} {role}s{hint}")
    first = members[0]
    for path, ckpt in zip(paths[1:], members[1:]):
        for what in shared:
            if ckpt[what] != first[what]:
                raise UserError(f"{path} differs from {paths[0]} in {what} ({ckpt[what]} vs {first[what]}): "
                                f"{joins} {role}s of one {' and '.join(shared)}")
    return members


def model_from_checkpoint(ckpt: dict) -> EmbeddingNet | EnsembleNet:
    """The checkpoint's model, weights loaded, in eval mode (never downloads: `pretrained` is not applied)."""
    model = build_model({**ckpt["arch"], "pretrained": None})
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).strip().splitlines()[:2])
        raise UserError(f"checkpoint weights do not fit {ckpt['arch']}: {detail}") from None
    return model.eval()


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients: the teacher during student training."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
