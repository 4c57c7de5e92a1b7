"""The committed stubs are exactly what the committed .proto files generate: nobody edited them by hand."""
from __future__ import annotations

from pathlib import Path

import pytest

import asymsearch.protos
from asymsearch.protos.generate import VERSIONS, generate

PROTOS = Path(asymsearch.protos.__file__).resolve().parent


def test_stubs_match_the_proto(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the dev extra) is needed to regenerate the stubs")
    written = generate(out=tmp_path)
    assert written, "generate wrote nothing"
    for version in VERSIONS:
        fresh = sorted(p.name for p in (tmp_path / version).iterdir())
        assert {"search_pb2.py", "search_pb2.pyi", "search_pb2_grpc.py"} <= set(fresh)
        for name in fresh:
            committed = PROTOS / version / name
            assert committed.is_file(), f"{committed} is not committed; run python -m asymsearch.protos.generate"
            assert (tmp_path / version / name).read_bytes() == committed.read_bytes(), (
                f"{committed} differs from what {version}/*.proto generates; "
                f"run python -m asymsearch.protos.generate and commit the result")
