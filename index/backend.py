"""One read interface over the index stores, chosen by the index location.

    a folder (plain, or a versioned root with CURRENT)  -> faiss, `asymsearch.index.store.SearchIndex`
    milvus://HOST:PORT/NAME                             -> a Milvus cluster, `asymsearch.index.milvus.MilvusIndex`
    milvus-lite:///path/to/file.db[/NAME]               -> Milvus Lite in this process (NAME default "asymsearch")

`open_index(location)` opens what the location names now (CURRENT, or the collection its alias names);
`current_id(location)` says which index that is without opening it (a follower compares it with the served
index's `manifest_id` to know when to swap). The Milvus modules are imported only for a Milvus location.
"""
from __future__ import annotations

import os
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from asymsearch.core.errors import UserError
from asymsearch.core.manifest import IndexManifest

MILVUS_SCHEMES = ("milvus://", "milvus-lite://")


class StoreUnavailable(UserError):
    """The store behind an index (a Milvus address) does not answer; the server answers UNAVAILABLE."""


@runtime_checkable
class IndexStore(Protocol):
    """What the server, evaluation and benchmarks need from an opened index, whatever the backend."""

    manifest: IndexManifest
    manifest_id: str  # which index this is (the digest of its manifest; for Milvus, collection:digest)
    version: str | None  # the version folder's or collection's name

    @property
    def dim(self) -> int: ...

    @property
    def count(self) -> int: ...

    @property
    def teacher_id(self) -> str: ...

    def search(self, vectors: np.ndarray, k: int, *, filter: Any = None) -> tuple[np.ndarray, np.ndarray]: ...

    def lookup_records(self, ids: Sequence[int], *, skip_missing: bool = False) -> list[dict[str, Any]]: ...

    def ids(self) -> np.ndarray: ...

    def close(self) -> None: ...


def is_milvus(location: Any) -> bool:
    """True when `location` names a Milvus collection rather than a folder."""
    return isinstance(location, str) and location.startswith(MILVUS_SCHEMES)


def location_text(location: str | os.PathLike) -> str | os.PathLike:
    """A Milvus location as given (a `Path` would fold its '//'), anything else as a path."""
    return location if is_milvus(location) else os.fspath(location)


def open_index(location: str | os.PathLike, **kw: Any) -> IndexStore:
    """The index `location` names now: a faiss folder or root, or the Milvus collection behind its alias."""
    if is_milvus(location):
        from asymsearch.index.milvus import MilvusIndex
        return MilvusIndex.open(str(location), **kw)
    from asymsearch.index.store import SearchIndex
    return SearchIndex.open(location, **kw)


def current_id(location: str | os.PathLike) -> str:
    """The `manifest_id` of the index `location` names now, as `open_index(location).manifest_id` would say."""
    if is_milvus(location):
        from asymsearch.index.milvus import current_id as milvus_current
        return milvus_current(str(location))
    from asymsearch.index.store import manifest_id
    from asymsearch.index.versions import resolve_index_folder
    return manifest_id(resolve_index_folder(location)[0])
