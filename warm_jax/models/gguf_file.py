"""The GGUF container: metadata and tensor locations, parsed straight from a memory map.

The ``gguf`` package's ``GGUFReader`` builds a numpy view for every part of every metadata field;
for SmolLM2's tokenizer (49,152 tokens and 48,900 merges, each a string field part) that took ~10 s
of a 14 s import on a 2-core VM. This reader walks the same little-endian layout with
``struct.unpack_from`` (~0.2 s) and leaves tensor payloads as zero-copy ``uint8``/typed views of the
map; dequantisation stays with ``gguf.quants``.

Layout (GGUF v2 and v3; v1 used 32-bit counts and is refused):

    magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv × (key: string, value_type u32, value)
    n_tensors × (name: string, n_dims u32, dims u64 × n_dims, ggml_type u32, offset u64)
    padding to general.alignment (default 32), then the tensor data; a tensor's offset counts from there.

A string is a u64 byte length and UTF-8 bytes; an array is an item type u32, a count u64 and the items.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types: id -> (struct code, numpy dtype); 8 is a string, 9 an array.
_SCALARS = {
    0: ("<B", np.uint8),
    1: ("<b", np.int8),
    2: ("<H", np.uint16),
    3: ("<h", np.int16),
    4: ("<I", np.uint32),
    5: ("<i", np.int32),
    6: ("<f", np.float32),
    7: ("<?", np.bool_),
    10: ("<Q", np.uint64),
    11: ("<q", np.int64),
    12: ("<d", np.float64),
}
_STRING, _ARRAY = 8, 9


class GGUFFormatError(ValueError):
    """The file is not a GGUF this reader understands; the message names the file and the offset."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor: ``dims`` in GGUF (ggml) order, innermost first; ``offset`` from the data start."""

    name: str
    dims: tuple[int, ...]
    ggml_type: int
    offset: int


@dataclasses.dataclass
class GGUFFile:
    """A parsed GGUF: ``fields`` (key -> int/float/bool/str or a list of them) and tensor infos.

    ``tensor_data(info)`` returns the payload as ``gguf.GGUFReader`` would: F32/F16/… as a typed
    array in numpy order (the reverse of ``dims``), quantised types as ``uint8`` rows of blocks.
    """

    path: str
    version: int
    fields: dict[str, Any]
    tensors: list[TensorInfo]
    data_start: int
    _map: mmap.mmap = dataclasses.field(repr=False)

    def tensor_data(self, info: TensorInfo) -> np.ndarray:
        import gguf

        qtype = gguf.GGMLQuantizationType(info.ggml_type)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        shape = tuple(reversed(info.dims))
        n = int(np.prod(shape, dtype=np.int64))
        plain = {
            gguf.GGMLQuantizationType.F32: np.float32,
            gguf.GGMLQuantizationType.F16: np.float16,
            gguf.GGMLQuantizationType.F64: np.float64,
            gguf.GGMLQuantizationType.I8: np.int8,
            gguf.GGMLQuantizationType.I16: np.int16,
            gguf.GGMLQuantizationType.I32: np.int32,
            gguf.GGMLQuantizationType.I64: np.int64,
        }
        start = self.data_start + info.offset
        if qtype in plain:
            dtype, count = plain[qtype], n
        else:
            if shape[-1] % block:
                raise GGUFFormatError(
                    f"{self.path}: tensor {info.name!r} rows of {shape[-1]} are not a multiple of "
                    f"{qtype.name}'s block of {block}"
                )
            dtype, count = np.uint8, n // block * type_size
            shape = (*shape[:-1], shape[-1] // block * type_size)
        nbytes = count * np.dtype(dtype).itemsize
        if start + nbytes > len(self._map):
            raise GGUFFormatError(f"{self.path}: tensor {info.name!r} runs past the end of the file")
        return np.frombuffer(self._map, dtype, count, start).reshape(shape)


def read(path: str | Path) -> GGUFFile:
    """Parses ``path``'s header; tensor payloads stay in the (read-only) memory map."""
    path = str(path)
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:  # mmap refuses an empty file with a message that names none
            raise GGUFFormatError(f"{path}: empty file (0 bytes), not a GGUF file")
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    p = _Parser(m, path)
    if m[:4] != MAGIC:
        raise GGUFFormatError(f"{path}: not a GGUF file (magic {bytes(m[:4])!r})")
    p.pos = 4
    version = p.scalar("<I")
    if version not in (2, 3):
        hint = " (a big-endian file?)" if version > 0xFFFF else ""
        raise GGUFFormatError(f"{path}: GGUF version {version} is not supported (2 or 3){hint}")
    n_tensors, n_kv = p.scalar("<Q"), p.scalar("<Q")
    fields: dict[str, Any] = {}
    for _ in range(n_kv):
        key = p.string()
        fields[key] = p.value(p.scalar("<I"), key)
    tensors = []
    for _ in range(n_tensors):
        name = p.string()
        n_dims = p.scalar("<I")
        dims = struct.unpack_from(f"<{n_dims}Q", m, p.pos)
        p.pos += 8 * n_dims
        tensors.append(TensorInfo(name, tuple(int(d) for d in dims), p.scalar("<I"), p.scalar("<Q")))
    align = int(fields.get("general.alignment", DEFAULT_ALIGNMENT))
    data_start = -(-p.pos // align) * align
    return GGUFFile(path, version, fields, tensors, data_start, m)


class _Parser:
    def __init__(self, buf: mmap.mmap, path: str):
        self.buf, self.path, self.pos = buf, path, 0

    def scalar(self, code: str):
        try:
            (v,) = struct.unpack_from(code, self.buf, self.pos)
        except struct.error:
            raise GGUFFormatError(f"{self.path}: truncated header at byte {self.pos}") from None
        self.pos += struct.calcsize(code)
        return v

    def string(self) -> str:
        n = self.scalar("<Q")
        raw = self.buf[self.pos : self.pos + n]
        if len(raw) != n:
            raise GGUFFormatError(f"{self.path}: truncated string at byte {self.pos}")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFFormatError(f"{self.path}: a string at byte {self.pos} is not UTF-8 ({e.reason})") from None
        self.pos += n
        return text

    def value(self, vtype: int, key: str):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype][0])
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            raise GGUFFormatError(f"{self.path}: field {key!r} has unknown value type {vtype}")
        itype, n = self.scalar("<I"), self.scalar("<Q")
        if itype in _SCALARS:  # numeric arrays (token types, scores) in one read
            dtype = np.dtype(_SCALARS[itype][1]).newbyteorder("<")
            if self.pos + n * dtype.itemsize > len(self.buf):
                raise GGUFFormatError(f"{self.path}: field {key!r} runs past the end of the file")
            out = np.frombuffer(self.buf, dtype, n, self.pos).tolist()
            self.pos += n * dtype.itemsize
            return out
        return [self.value(itype, key) for _ in range(n)]
