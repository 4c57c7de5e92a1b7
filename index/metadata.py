"""The metadata of an index folder: `meta.sqlite`, one row per indexed image, keyed by its stable faiss id.

Schema: `items(id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE, label TEXT NOT NULL, extra TEXT)`. `extra` holds
the user's own columns for that image (from a CSV given to `index build/add --metadata`) as a JSON object, or NULL.
A path appears at most once in an index: adding an image that is already there is refused.
"""
from __future__ import annotations

import csv
import json
import os
import sqlite3
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from asymsearch.core.errors import UserError

SCHEMA = ("CREATE TABLE items(id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE, label TEXT NOT NULL, "
          "extra TEXT)")
RESERVED_COLUMNS = ("id", "path", "label")


def write_metadata(path: str | os.PathLike, rows: Iterable[tuple[int, str, str, Mapping[str, Any] | None]]) -> None:
    """Create `path` holding `rows` of (id, path, label, extra columns or None)."""
    con = sqlite3.connect(path)
    try:
        with con:
            con.execute(SCHEMA)
            insert_rows(con, rows)
    finally:
        con.close()


def insert_rows(con: sqlite3.Connection, rows: Iterable[tuple[int, str, str, Mapping[str, Any] | None]]) -> None:
    try:
        con.executemany("INSERT INTO items(id, path, label, extra) VALUES (?, ?, ?, ?)",
                        ((int(i), p, label, json.dumps(dict(extra), sort_keys=True) if extra else None)
                         for i, p, label, extra in rows))
    except sqlite3.IntegrityError as e:
        raise UserError(f"duplicate image path or id in the index metadata: {e}") from None


def existing_paths(db: str | os.PathLike, paths: Sequence[str]) -> list[str]:
    """Those of `paths` that the metadata already holds."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT path FROM items WHERE path IN (SELECT value FROM json_each(?))",
                           (json.dumps(list(paths)),)).fetchall()
    finally:
        con.close()
    return sorted(r[0] for r in rows)


def existing_ids(db: str | os.PathLike, ids: Sequence[int]) -> set[int]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT id FROM items WHERE id IN (SELECT value FROM json_each(?))",
                           (json.dumps([int(i) for i in ids]),)).fetchall()
    finally:
        con.close()
    return {r[0] for r in rows}


def read_metadata_csv(csv_path: str | os.PathLike, image_root: str | os.PathLike) -> dict[str, dict[str, str]]:
    """{absolute image path: {column: value}} from a CSV with a `path` column (absolute, or relative to
    `image_root`) and any other columns. Duplicate paths or a missing `path` column: `UserError`."""
    csv_path, image_root = Path(csv_path), Path(image_root).resolve()
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            if "path" not in header:
                raise UserError(f"metadata CSV {csv_path} needs a 'path' column (its header has {len(header)} "
                                f"column(s), none named 'path')")
            bad = [c for c in header if c in ("id", "label") or not c]
            if bad:
                raise UserError(f"metadata CSV {csv_path}: the column names id and label are reserved, and empty ones "
                                f"are not allowed")
            out: dict[str, dict[str, str]] = {}
            for line, row in enumerate(reader, start=2):
                p = Path(row.pop("path") or "")
                key = str((p if p.is_absolute() else image_root / p).resolve())
                if key in out:
                    raise UserError(f"metadata CSV {csv_path} line {line}: an image is listed twice")
                out[key] = {k: v for k, v in row.items() if k is not None}
    except FileNotFoundError:
        raise UserError(f"metadata CSV not found: {csv_path}") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"cannot read metadata CSV {csv_path}: not UTF-8 CSV ({e.__class__.__name__})") from None
    return out


def match_metadata(columns: dict[str, dict[str, str]], paths: Sequence[str], csv_path: str) -> None:
    """Refuse CSV rows that name no listed image (a typo would otherwise be silently dropped)."""
    unknown = sorted(set(columns) - set(paths))
    if unknown:
        raise UserError(f"metadata CSV {csv_path} names {len(unknown)} path(s) that are not among the images "
                        f"being added")
