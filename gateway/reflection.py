"""Server reflection that serves the commented contract.

Python's generated descriptors carry no source comments, so plain reflection gives ``grpcurl
describe`` bare signatures. ``make proto`` also writes ``jobgate/v1/descriptor_set.binpb`` (with
source info); reflection answers for jobgate's own files from it, so ``describe`` shows every
RPC's and field's documentation. Method names (``Service.Method``) are resolved too.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool

DESCRIPTOR_SET = "descriptor_set.binpb"


def _commented_files() -> dict[str, descriptor_pb2.FileDescriptorProto]:
    data = (resources.files("jobgate.v1") / DESCRIPTOR_SET).read_bytes()
    return {f.name: f for f in descriptor_pb2.FileDescriptorSet.FromString(data).file}


class _File:
    """A file descriptor whose ``CopyToProto`` includes source comments when they are known."""

    def __init__(self, file: Any, commented: dict[str, descriptor_pb2.FileDescriptorProto]) -> None:
        self._file = file
        self._commented = commented
        self.name: str = file.name

    @property
    def dependencies(self) -> list[_File]:
        return [_File(d, self._commented) for d in self._file.dependencies]

    def CopyToProto(self, proto: descriptor_pb2.FileDescriptorProto) -> None:  # noqa: N802 - protobuf's name
        if self.name in self._commented:
            proto.CopyFrom(self._commented[self.name])
        else:
            self._file.CopyToProto(proto)


class CommentedPool:
    """A descriptor pool for the reflection service (the default pool, plus comments)."""

    def __init__(self) -> None:
        self._pool = descriptor_pool.Default()
        self._commented = _commented_files()

    def FindFileByName(self, name: str) -> _File:  # noqa: N802
        return _File(self._pool.FindFileByName(name), self._commented)

    def FindFileContainingSymbol(self, symbol: str) -> _File:  # noqa: N802
        try:
            return _File(self._pool.FindFileContainingSymbol(symbol), self._commented)
        except KeyError:
            service, _, method = symbol.rpartition(".")
            if not service or not method:
                raise
            return _File(self._pool.FindFileContainingSymbol(service), self._commented)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)
