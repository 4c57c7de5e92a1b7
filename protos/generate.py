"""Generate the Python stubs from `protos/v1/*.proto` with grpcio-tools (the `dev` extra).

    python -m asymsearch.protos.generate            # write the stubs next to the .proto files
    python -m asymsearch.protos.generate --out DIR  # write them below DIR instead (the stub test compares)

The .proto files are compiled under the virtual path `asymsearch/protos/...`, so the generated modules import
each other as `asymsearch.protos.v1.search_pb2`, the package they are installed as.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
VERSIONS = ("v1",)


def generate(out: Path = HERE) -> list[Path]:
    """Compile every .proto of every version into `out/<version>/`; return the files written."""
    from grpc_tools import protoc  # dev dependency: only needed to regenerate
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        for version in VERSIONS:
            protos = sorted((HERE / version).glob("*.proto"))
            args = ["protoc", f"-I{include}", f"-Iasymsearch/protos/{version}={HERE / version}",
                    f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}"]
            args += [f"asymsearch/protos/{version}/{p.name}" for p in protos]
            if protoc.main(args) != 0:
                raise RuntimeError(f"protoc failed on {protos}")
            dest = out / version
            dest.mkdir(parents=True, exist_ok=True)
            for f in sorted((Path(tmp) / "asymsearch" / "protos" / version).iterdir()):
                shutil.copyfile(f, dest / f.name)
                written.append(dest / f.name)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE, help="folder to write <version>/*_pb2*.py into")
    args = parser.parse_args(argv)
    for f in generate(args.out):
        print(f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
