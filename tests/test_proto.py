"""The contract: generated code is what `make proto` writes, and `buf lint` passes."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_generated_code_matches_the_proto_files(tmp_path: Path) -> None:
    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    (tmp_path / "jobgate" / "v1").mkdir(parents=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            "proto",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            "--include_source_info",
            f"--descriptor_set_out={tmp_path}/jobgate/v1/descriptor_set.binpb",
            *protos,
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(
        p.relative_to(ROOT / "generated")
        for p in (ROOT / "generated").rglob("*")
        if p.is_file() and p.name != "__init__.py" and "__pycache__" not in p.parts
    )
    assert fresh == committed, "generated/ is stale: run `make proto`"
    stale = [str(p) for p in fresh if not filecmp.cmp(tmp_path / p, ROOT / "generated" / p, shallow=False)]
    assert stale == [], f"generated/ is stale ({stale}): run `make proto`"


def test_buf_lint_passes_on_the_proto_files() -> None:
    buf = shutil.which("buf", path=str(BIN)) or shutil.which("buf")
    assert buf, "buf not found: `make install` installs buf-bin"
    result = subprocess.run([buf, "lint"], cwd=ROOT / "proto", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
