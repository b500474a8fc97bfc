"""Regenerate the gRPC stubs: ``python -m privface.protogen``.

The ``.proto`` files under ``proto/privface/v1`` are compiled with ``grpc_tools.protoc``
(the ``dev`` extra) into ``privface/v1/``: ``*_pb2.py`` (messages), ``*_pb2.pyi`` (types)
and ``*_pb2_grpc.py`` (stubs and servicers). Because the proto path mirrors the Python
package (``privface/v1/gallery.proto``), the generated imports already read
``from privface.v1 import gallery_pb2``; nothing needs rewriting. The stubs are committed
so that installing privface never needs protoc.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO / "proto"


def generate(out_dir: Path = REPO) -> list[Path]:
    """Compile every ``proto/privface/v1/*.proto``; returns the files written."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(PROTO_ROOT.glob("privface/v1/*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_ROOT / 'privface' / 'v1'}")
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(p.relative_to(PROTO_ROOT)) for p in protos),
    ]
    code = protoc.main(args)
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")
    package = out_dir / "privface" / "v1"
    init = package / "__init__.py"
    if not init.exists():
        init.write_text('"""gRPC stubs of privface.v1 (python -m privface.protogen)."""\n')
    written = []
    for proto in protos:
        stem = proto.stem
        written += [package / f"{stem}_pb2.py", package / f"{stem}_pb2.pyi",
                    package / f"{stem}_pb2_grpc.py"]
    return written


def main() -> int:
    for path in generate():
        print(path.relative_to(REPO))
    return 0


if __name__ == "__main__":
    sys.exit(main())
