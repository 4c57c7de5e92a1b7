"""What the Admin service's AddImages / RemoveImages run: the index stage's own updates (`asymsearch.index.update`),
which publish a new version of the index root (the server then reloads it like any new CURRENT).

Adding embeds the new images with the teacher, so the server must be given the teacher's ONNX model for it
(`asymsearch serve --admin --teacher teacher.onnx`); removing needs no model.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from asymsearch.core.errors import UserError


class TeacherUpdater:
    """`IndexUpdater` on top of `asymsearch.index.update`; `keep` old versions are kept (None: all)."""

    def __init__(self, teacher: str | os.PathLike | None, *, keep: int | None = None) -> None:
        self.teacher = Path(teacher) if teacher else None
        self.keep = keep

    def add(self, root: Path, folder: str, metadata_csv: str | None = None) -> None:
        from asymsearch.index.update import add_images
        if self.teacher is None:
            raise UserError("adding images needs the teacher model: start the server with --teacher T.onnx")
        add_images(root, self.teacher, folder, metadata=metadata_csv or None, keep=self.keep, progress=False)

    def remove(self, root: Path, ids: Sequence[int]) -> None:
        from asymsearch.index.update import remove_ids
        remove_ids(root, ids, keep=self.keep)
