"""A GGUF file's header: metadata scalars and strings, and where each tensor's bytes are.

gguf-py's `GGUFReader` builds a numpy view for every element of every metadata array; on a file whose vocabulary
lives there that takes seconds (6 s for a 49k-token vocabulary, more for Qwen's 151k) and a restart would pay it
each time. This reads the header in one pass, skips arrays it is not asked for, and never touches tensor data:
the loader reads each tensor's bytes itself (gguf_tensors.py), so nothing is mapped into the process.
Layout: magic, version, tensor count, metadata count, metadata (key, type, value), tensor infos (name, dims
innermost first, ggml type, offset), padding to `general.alignment`, tensor data."""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
SMALL_ARRAY = 4096  # arrays up to this length are kept (per-layer settings); longer ones (vocabularies) skipped


class GGUFFormatError(ValueError):
    """The file is not a GGUF this reader understands."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: rows first
    qtype: str  # ggml type name, e.g. "Q4_K"
    offset: int  # absolute, in the file
    nbytes: int


@dataclass
class GGUFHeader:
    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    tokenizer_digest: str = ""  # of the `tokenizer.*` entries as stored: files sharing a tokenizer share its cache
    tokenizer_spans: list[tuple[str, int, int]] = field(default_factory=list)  # (key, value start, end) in the file

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def types(self) -> dict[str, int]:
        """{ggml type: tensor count}, for logs."""
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            counts[t.qtype] = counts.get(t.qtype, 0) + 1
        return counts


def _unpack(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise GGUFFormatError("the file ends inside its header")
    return struct.unpack(fmt, data)[0]


def _string(f: BinaryIO) -> str:
    return f.read(_unpack(f, "<Q")).decode("utf-8", errors="replace")


def _value(f: BinaryIO, kind: int) -> Any:
    if kind in SCALARS:
        return _unpack(f, SCALARS[kind])
    if kind == STRING:
        return _string(f)
    if kind != ARRAY:
        raise GGUFFormatError(f"unknown metadata value type {kind}")
    item, count = _unpack(f, "<I"), _unpack(f, "<Q")
    if count <= SMALL_ARRAY:
        return [_value(f, item) for _ in range(count)]
    if item in SCALARS:
        f.seek(count * struct.calcsize(SCALARS[item]), 1)
    else:
        for _ in range(count):
            _value(f, item)
    return ArrayLength(count)


class ArrayLength(int):
    """A long metadata array that was skipped; its value is its length."""


def _tensor_info(f: BinaryIO) -> tuple[str, tuple[int, ...], str, int]:
    name = _string(f)
    dims = [_unpack(f, "<Q") for _ in range(_unpack(f, "<I"))]
    kind = _unpack(f, "<I")
    try:
        qtype = GGMLQuantizationType(kind).name
    except ValueError:
        raise GGUFFormatError(f"tensor {name!r} has unknown ggml type {kind}") from None
    return name, tuple(reversed(dims)), qtype, _unpack(f, "<Q")


def tensor_nbytes(shape: tuple[int, ...], qtype: str) -> int:
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    count = 1
    for d in shape:
        count *= d
    if shape[-1] % block:
        raise GGUFFormatError(f"a {qtype} row of {shape[-1]} values is not whole {block}-value blocks")
    return count // block * size


def read_header(path: Path) -> GGUFHeader:
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise GGUFFormatError(f"{path} is not a GGUF file")
        version = _unpack(f, "<I")
        if version not in (2, 3):
            raise GGUFFormatError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_meta = _unpack(f, "<Q"), _unpack(f, "<Q")
        metadata, tokenizer_spans = {}, []
        for _ in range(n_meta):
            key, start = _string(f), f.tell()
            metadata[key] = _value(f, _unpack(f, "<I"))
            if key.startswith("tokenizer."):
                tokenizer_spans.append((key, start, f.tell()))
        infos = [_tensor_info(f) for _ in range(n_tensors)]
        align = int(metadata.get("general.alignment", 32))
        start = -(-f.tell() // align) * align
        digest = hashlib.sha256()
        for key, begin, end in tokenizer_spans:
            f.seek(begin)
            digest.update(key.encode() + f.read(end - begin))
    size = path.stat().st_size
    header = GGUFHeader(path, metadata, tokenizer_digest=digest.hexdigest()[:16], tokenizer_spans=tokenizer_spans)
    for name, shape, qtype, offset in infos:
        info = TensorInfo(name, shape, qtype, start + offset, tensor_nbytes(shape, qtype))
        if info.offset + info.nbytes > size:
            raise GGUFFormatError(f"{path}: tensor {name!r} runs past the end of the file (truncated download?)")
        header.tensors[name] = info
    return header



def write_tokenizer_only(header: GGUFHeader, out: Path, architecture: str) -> None:
    """A GGUF of no tensors holding `header`'s tokenizer entries byte for byte, under another architecture name
    (for a tokenizer converter that knows the tokenizer but not the model)."""
    def string(text: str) -> bytes:
        return struct.pack("<Q", len(text.encode())) + text.encode()

    with open(header.path, "rb") as src, open(out, "wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, 0, len(header.tokenizer_spans) + 1))
        f.write(string("general.architecture") + struct.pack("<I", STRING) + string(architecture))
        for key, begin, end in header.tokenizer_spans:
            src.seek(begin)
            f.write(string(key) + src.read(end - begin))
