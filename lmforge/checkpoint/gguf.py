"""Read GGUF files (llama.cpp's checkpoint format) ourselves: header, metadata, tensor table, dequantization.

    g = read_gguf("model.gguf")
    g.metadata["general.architecture"]          # 'llama'
    g.tensors["blk.0.attn_q.weight"]           # GGUFTensorInfo(shape=(576, 576), ggml_type=Q4_1, ...)
    w = g.tensor("blk.0.attn_q.weight")         # float32 torch tensor (576, 576), dequantized

The layout, from ggml's docs/gguf.md (everything little-endian):

    "GGUF" | u32 version (2 or 3) | u64 tensor_count | u64 kv_count
    kv_count x     string key | u32 value_type | value
    tensor_count x string name | u32 n_dims | n_dims x u64 ne (fastest-moving first) | u32 ggml_type | u64 offset
    padding to `general.alignment` (default 32), then the tensor data; a tensor starts at data_start + offset
    string = u64 byte length + UTF-8 bytes; array = u32 element type + u64 count + elements (arrays may nest)

ggml lists dimensions fastest-moving first, torch slowest first, so a matrix with ne = [in, out] is a torch
tensor of shape (out, in): the same orientation as nn.Linear's weight.

The file is memory-mapped; nothing is read until a tensor is asked for. Every length and count in the header
is checked against the bytes actually left in the file before anything is allocated, so a truncated or
corrupt file is a one-line LmforgeError naming the file (and the tensor), never a crash or a huge allocation.
This module knows the file format only; turning a GGUF into an lmforge run is `checkpoint/convert.py`.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.common import LmforgeError

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # v1 counted with u32 and is long gone
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NESTING = 8  # arrays of arrays of ...: deeper than any real file, shallow enough for the stack
QK_K = 256  # weights per k-quant super-block


class GGMLType(IntEnum):
    """ggml tensor type ids (ggml.h `enum ggml_type`) for the types whose storage size we know."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39


# type -> (weights per block, bytes per block), as ggml's type traits (ggml.c `type_traits`)
BLOCK: dict[GGMLType, tuple[int, int]] = {
    GGMLType.F32: (1, 4), GGMLType.F16: (1, 2), GGMLType.BF16: (1, 2), GGMLType.F64: (1, 8),
    GGMLType.I8: (1, 1), GGMLType.I16: (1, 2), GGMLType.I32: (1, 4), GGMLType.I64: (1, 8),
    GGMLType.Q4_0: (32, 18), GGMLType.Q4_1: (32, 20), GGMLType.Q5_0: (32, 22), GGMLType.Q5_1: (32, 24),
    GGMLType.Q8_0: (32, 34), GGMLType.Q8_1: (32, 40),
    GGMLType.Q2_K: (QK_K, 84), GGMLType.Q3_K: (QK_K, 110), GGMLType.Q4_K: (QK_K, 144),
    GGMLType.Q5_K: (QK_K, 176), GGMLType.Q6_K: (QK_K, 210), GGMLType.Q8_K: (QK_K, 292),
    GGMLType.IQ2_XXS: (QK_K, 66), GGMLType.IQ2_XS: (QK_K, 74), GGMLType.IQ3_XXS: (QK_K, 98),
    GGMLType.IQ1_S: (QK_K, 50), GGMLType.IQ4_NL: (32, 18), GGMLType.IQ3_S: (QK_K, 110),
    GGMLType.IQ2_S: (QK_K, 82), GGMLType.IQ4_XS: (QK_K, 136), GGMLType.IQ1_M: (QK_K, 56),
    GGMLType.TQ1_0: (QK_K, 54), GGMLType.TQ2_0: (QK_K, 66), GGMLType.MXFP4: (32, 17),
}


class ValueType(IntEnum):
    """GGUF metadata value types (gguf.md `gguf_metadata_value_type`)."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# fixed-size value types -> numpy dtype (little-endian, as the file stores them)
_SCALAR_DTYPE = {
    ValueType.UINT8: "<u1", ValueType.INT8: "<i1", ValueType.UINT16: "<u2", ValueType.INT16: "<i2",
    ValueType.UINT32: "<u4", ValueType.INT32: "<i4", ValueType.FLOAT32: "<f4", ValueType.BOOL: "<u1",
    ValueType.UINT64: "<u8", ValueType.INT64: "<i8", ValueType.FLOAT64: "<f8",
}
_MIN_VALUE_BYTES = {**{t: np.dtype(d).itemsize for t, d in _SCALAR_DTYPE.items()},
                    ValueType.STRING: 8, ValueType.ARRAY: 12}


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One entry of the tensor table. `shape` is torch order (slowest first); `offset` is absolute in the file."""

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLType
    offset: int
    nbytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class GGUFFile:
    """A parsed GGUF: `metadata` (key -> value), `value_types` (key -> ValueType, or (ARRAY, element type)),
    `tensors` (name -> GGUFTensorInfo, file order). Tensor bytes stay in the memory map until asked for."""

    def __init__(self, path: Path, version: int, metadata: dict[str, Any], value_types: dict[str, Any],
                 tensors: dict[str, GGUFTensorInfo], alignment: int, data_start: int, buffer: Any) -> None:
        self.path = path
        self.version = version
        self.metadata = metadata
        self.value_types = value_types
        self.tensors = tensors
        self.alignment = alignment
        self.data_start = data_start
        self._buffer = buffer

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of a tensor as a read-only uint8 view of the file (no copy)."""
        info = self._info(name)
        return np.frombuffer(self._buffer, dtype=np.uint8, count=info.nbytes, offset=info.offset)

    def tensor(self, name: str) -> torch.Tensor:
        """A tensor dequantized to float32, in torch order."""
        info = self._info(name)
        return dequantize(self.raw(name), info.ggml_type, info.shape, where=f"{self.path}: tensor {name!r}")

    def _info(self, name: str) -> GGUFTensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise LmforgeError(f"{self.path}: no tensor named {name!r}") from None

    def __repr__(self) -> str:
        return (f"GGUFFile({str(self.path)!r}, version={self.version}, {len(self.metadata)} keys, "
                f"{len(self.tensors)} tensors)")


# ---- parsing ----


class _Reader:
    """A cursor over the mapped file; every read checks that the bytes exist first."""

    def __init__(self, buffer: Any, size: int, path: Path) -> None:
        self.buf, self.size, self.path, self.pos = buffer, size, path, 0

    def fail(self, what: str) -> LmforgeError:
        return LmforgeError(f"{self.path}: corrupt or truncated GGUF: {what} (at byte {self.pos} of {self.size})")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} needs {n} bytes, only {self.size - self.pos} left")

    def unpack(self, fmt: str, what: str) -> tuple:
        n = struct.calcsize(fmt)
        self.need(n, what)
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return values

    def u32(self, what: str) -> int:
        return self.unpack("<I", what)[0]

    def u64(self, what: str) -> int:
        return self.unpack("<Q", what)[0]

    def string(self, what: str) -> str:
        if self.pos + 8 > self.size:
            raise self.fail(f"length of {what} needs 8 bytes, only {self.size - self.pos} left")
        (n,) = struct.unpack_from("<Q", self.buf, self.pos)
        self.pos += 8
        self.need(n, what)
        data = self.buf[self.pos:self.pos + n]  # mmap slices are bytes
        self.pos += n
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None

    def count(self, what: str, min_item_bytes: int) -> int:
        """A u64 count, refused when even the smallest items could not fit in what is left of the file."""
        n = self.u64(what)
        if n * min_item_bytes > self.size - self.pos:
            raise self.fail(f"{what} is {n}, more than the {self.size - self.pos} bytes left could hold")
        return n

    def value(self, vtype: int, key: str, depth: int = 0) -> tuple[Any, Any]:
        """(value, its type) of one metadata value; arrays become lists (numeric ones read in one go)."""
        if vtype == ValueType.STRING:
            return self.string(f"value of {key!r}"), ValueType.STRING
        if vtype in _SCALAR_DTYPE:
            dtype = np.dtype(_SCALAR_DTYPE[vtype])
            self.need(dtype.itemsize, f"value of {key!r}")
            v = np.frombuffer(self.buf, dtype=dtype, count=1, offset=self.pos)[0].item()
            self.pos += dtype.itemsize
            return (bool(v) if vtype == ValueType.BOOL else v), ValueType(vtype)
        if vtype == ValueType.ARRAY:
            if depth >= MAX_NESTING:
                raise self.fail(f"{key!r} nests arrays deeper than {MAX_NESTING}")
            etype = self.u32(f"array type of {key!r}")
            if etype not in _MIN_VALUE_BYTES:
                raise self.fail(f"{key!r} is an array of unknown value type {etype}")
            n = self.count(f"array length of {key!r}", _MIN_VALUE_BYTES[etype])
            if etype in _SCALAR_DTYPE:
                values = np.frombuffer(self.buf, dtype=_SCALAR_DTYPE[etype], count=n, offset=self.pos).tolist()
                self.pos += n * _MIN_VALUE_BYTES[etype]
                return ([bool(v) for v in values] if etype == ValueType.BOOL else values), (ValueType.ARRAY,
                                                                                            ValueType(etype))
            if etype == ValueType.STRING:  # vocabularies: ~100k strings, so a tight loop
                return [self.string(f"element of {key!r}") for _ in range(n)], (ValueType.ARRAY, ValueType.STRING)
            items = [self.value(etype, key, depth + 1) for _ in range(n)]
            inner = items[0][1] if items else ValueType(etype)
            return [v for v, _ in items], (ValueType.ARRAY, inner)
        raise self.fail(f"{key!r} has unknown value type {vtype}")


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF file's header, metadata and tensor table, and map its data (nothing dequantized yet)."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"GGUF file not found: {path}")
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise LmforgeError(f"{path}: not a GGUF file ({size} bytes, shorter than the header)")
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise LmforgeError(f"cannot read {path}: {e.strerror or e}") from None
    r = _Reader(buffer, size, path)
    magic = bytes(buffer[:4])
    if magic != MAGIC:
        raise LmforgeError(f"{path}: not a GGUF file (starts with {magic!r}, expected {MAGIC!r})")
    r.pos = 4
    version = r.u32("version")
    if version not in VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        hint = " (a big-endian file; only little-endian GGUF is supported)" if swapped in VERSIONS else ""
        raise LmforgeError(f"{path}: unsupported GGUF version {version}{hint}; lmforge reads versions 2 and 3")
    n_tensors = r.u64("tensor count")
    n_kv = r.u64("metadata count")
    # A key/value takes at least 13 bytes (key length, type, 1-byte value), a tensor entry at least 32.
    if n_kv * 13 + n_tensors * 32 > size - r.pos:
        raise r.fail(f"{n_kv} metadata entries and {n_tensors} tensors cannot fit in the file")
    metadata, value_types = _read_metadata(r, n_kv)
    alignment = _alignment(metadata, path)
    entries = [_read_tensor_entry(r, i) for i in range(n_tensors)]
    data_start = -(-r.pos // alignment) * alignment
    tensors = _check_tensors(entries, data_start, alignment, size, path)
    return GGUFFile(path, version, metadata, value_types, tensors, alignment, data_start, buffer)


def _read_metadata(r: _Reader, n_kv: int) -> tuple[dict[str, Any], dict[str, Any]]:
    metadata: dict[str, Any] = {}
    value_types: dict[str, Any] = {}
    for i in range(n_kv):
        key = r.string(f"key of metadata entry {i}")
        if key in metadata:
            raise r.fail(f"metadata key {key!r} appears twice")
        metadata[key], value_types[key] = r.value(r.u32(f"value type of {key!r}"), key)
    return metadata, value_types


def _alignment(metadata: dict[str, Any], path: Path) -> int:
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise LmforgeError(f"{path}: general.alignment must be a power of two, got {alignment!r}")
    return alignment


def _read_tensor_entry(r: _Reader, i: int) -> tuple[str, tuple[int, ...], int, int]:
    """(name, torch-order shape, ggml type id, offset relative to the data section) of tensor entry i."""
    name = r.string(f"name of tensor {i}")
    n_dims = r.u32(f"dimension count of tensor {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise r.fail(f"tensor {name!r} has {n_dims} dimensions (1..{MAX_DIMS} allowed)")
    dims = r.unpack(f"<{n_dims}Q", f"dimensions of tensor {name!r}")
    ggml_type, offset = r.unpack("<IQ", f"type and offset of tensor {name!r}")
    return name, tuple(reversed(dims)), ggml_type, offset


def _check_tensors(entries: list[tuple[str, tuple[int, ...], int, int]], data_start: int, alignment: int,
                   size: int, path: Path) -> dict[str, GGUFTensorInfo]:
    """Validate every entry (type, shape, alignment, bytes inside the file) and build the table."""
    tensors: dict[str, GGUFTensorInfo] = {}
    for name, shape, type_id, offset in entries:
        where = f"{path}: tensor {name!r}"
        if name in tensors:
            raise LmforgeError(f"{where} appears twice in the tensor table")
        try:
            ggml_type = GGMLType(type_id)
        except ValueError:
            raise LmforgeError(f"{where} has unknown ggml type {type_id}") from None
        block_size, type_size = BLOCK[ggml_type]
        if any(d < 1 for d in shape):
            raise LmforgeError(f"{where} has a zero dimension: shape {shape}")
        n = 1
        for d in shape:
            n *= d
        if shape[-1] % block_size:
            raise LmforgeError(f"{where}: row length {shape[-1]} is not a multiple of the {ggml_type.name} "
                               f"block size {block_size}")
        nbytes = n // block_size * type_size
        if offset % alignment:
            raise LmforgeError(f"{where}: data offset {offset} is not aligned to {alignment}")
        start = data_start + offset
        if start + nbytes > size:
            raise LmforgeError(f"{where}: data runs past the end of the file (bytes {start}..{start + nbytes}, "
                               f"file has {size}); the file is truncated or corrupt")
        tensors[name] = GGUFTensorInfo(name, shape, ggml_type, start, nbytes)
    return tensors


# ---- dequantization ----
# Each function maps blocks (n, bytes per block) uint8 -> weights (n, weights per block) float32, vectorized
# over blocks. The layouts are ggml's (ggml-quants.c `dequantize_row_*`); the float32 arithmetic is done in the
# same order as ggml's reference (and gguf-py's quants.py), so results are bit for bit the same.

CHUNK_WEIGHTS = 1 << 22  # dequantize ~4M weights at a time: bounded temporaries for any tensor size


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """(n, 1) float32 from the little-endian half at byte `at` of every block."""
    return np.ascontiguousarray(blocks[:, at:at + 2]).view("<f2").astype(np.float32)


def _low_high(qs: np.ndarray) -> np.ndarray:
    """(n, k) bytes -> (n, 2k) 4-bit values: all low nibbles, then all high nibbles (ggml's order)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _bits(qh: np.ndarray, n_bits: int) -> np.ndarray:
    """(n, k) bytes -> (n, n_bits, k): bit b of every byte at [:, b, :]."""
    shifts = np.arange(n_bits, dtype=np.uint8).reshape(1, n_bits, 1)
    return (qh[:, None, :] >> shifts) & 1


def _q4_0(b: np.ndarray) -> np.ndarray:  # d f16 | 16 bytes of nibbles; w = d * (q - 8)
    q = _low_high(b[:, 2:18]).astype(np.int8) - np.int8(8)
    return _f16(b, 0) * q.astype(np.float32)


def _q4_1(b: np.ndarray) -> np.ndarray:  # d f16 | m f16 | 16 bytes of nibbles; w = d * q + m
    return _f16(b, 0) * _low_high(b[:, 4:20]).astype(np.float32) + _f16(b, 2)


def _five_bit(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1 quants: 4 low bits from the nibbles, bit 4 of weight j is bit j of the u32 qh."""
    high = (np.ascontiguousarray(qh).view("<u4") >> np.arange(32, dtype=np.uint32)) & 1  # (n, 32)
    return _low_high(qs) | (high.astype(np.uint8) << 4)


def _q5_0(b: np.ndarray) -> np.ndarray:  # d f16 | qh u32 | 16 bytes of nibbles; w = d * (q - 16)
    q = _five_bit(b[:, 2:6], b[:, 6:22]).astype(np.int8) - np.int8(16)
    return _f16(b, 0) * q.astype(np.float32)


def _q5_1(b: np.ndarray) -> np.ndarray:  # d f16 | m f16 | qh u32 | 16 bytes of nibbles; w = d * q + m
    return _f16(b, 0) * _five_bit(b[:, 4:8], b[:, 8:24]).astype(np.float32) + _f16(b, 2)


def _q8_0(b: np.ndarray) -> np.ndarray:  # d f16 | 32 x int8; w = q * d
    return np.ascontiguousarray(b[:, 2:34]).view(np.int8).astype(np.float32) * _f16(b, 0)


def _q2_k(b: np.ndarray) -> np.ndarray:
    """scales[16] (low nibble scale, high nibble min) | qs[64] | d f16 | dmin f16. 16 groups of 16 weights.
    qs holds two halves of 32 bytes; each half gives 4 x 32 weights from bit pairs 0-1, 2-3, 4-5, 6-7."""
    n = b.shape[0]
    scales = b[:, :16]
    dl = (_f16(b, 80) * (scales & 0x0F).astype(np.float32)).reshape(n, 16, 1)
    ml = (_f16(b, 82) * (scales >> 4).astype(np.float32)).reshape(n, 16, 1)
    qs = b[:, 16:80].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    q = (qs & 3).reshape(n, 16, 16).astype(np.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b: np.ndarray) -> np.ndarray:
    """hmask[32] | qs[64] | scales[12] (16 signed 6-bit) | d f16. Weights ordered as Q2_K; a weight's quant is its
    2 bits from qs minus 4 when its hmask bit (bit = 4 * half + pair index, byte = position) is clear."""
    n = b.shape[0]
    packed = b[:, 96:108]
    low = np.concatenate([packed[:, :8] & 0x0F, packed[:, :8] >> 4], axis=1)  # (n, 16) low 4 bits
    high = (packed[:, None, 8:12] >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 4, 1)) & 3
    scales = (low | (high.reshape(n, 16) << 4)).astype(np.int8) - np.int8(32)
    dl = (_f16(b, 108) * scales.astype(np.float32)).reshape(n, 16, 1)
    ql = (b[:, 32:96].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3
    hm = _bits(b[:, :32], 8)  # (n, 8, 32): [half * 4 + pair, position]
    q = ql.reshape(n, 8, 32).astype(np.int8) - ((hm ^ 1) << 2).astype(np.int8)
    return (dl * q.reshape(n, 16, 16).astype(np.float32)).reshape(n, QK_K)


def _k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins (ggml `get_scale_min_k4`).
    Bytes 0-3 hold scales 0-3 (low 6 bits), bytes 4-7 mins 0-3; scales/mins 4-7 take their low 4 bits from the
    nibbles of bytes 8-11 and their top 2 bits from the top bits of bytes 0-3 / 4-7."""
    a, m, lo = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    sc = np.concatenate([a & 0x3F, (lo & 0x0F) | ((a >> 6) << 4)], axis=1)
    mn = np.concatenate([m & 0x3F, (lo >> 4) | ((m >> 6) << 4)], axis=1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: 128 bytes = 4 chunks of 32; chunk c gives sub-block 2c (low nibbles) and 2c+1 (high)."""
    n = qs.shape[0]
    q = qs.reshape(n, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (q & 0x0F).reshape(n, 8, 32)


def _q4_k(b: np.ndarray) -> np.ndarray:  # d f16 | dmin f16 | scales[12] | qs[128]; w = d*sc * q - dmin*m
    n = b.shape[0]
    sc, mn = _k_scales(b[:, 4:16])
    d = (_f16(b, 0) * sc).reshape(n, 8, 1)
    dm = (_f16(b, 2) * mn).reshape(n, 8, 1)
    return (d * _k_nibbles(b[:, 16:144]).astype(np.float32) - dm).reshape(n, QK_K)


def _q5_k(b: np.ndarray) -> np.ndarray:
    """d f16 | dmin f16 | scales[12] | qh[32] | qs[128]: Q4_K plus a fifth bit, bit s of qh[j] for weight j of
    sub-block s."""
    n = b.shape[0]
    sc, mn = _k_scales(b[:, 4:16])
    d = (_f16(b, 0) * sc).reshape(n, 8, 1)
    dm = (_f16(b, 2) * mn).reshape(n, 8, 1)
    q = _k_nibbles(b[:, 48:176]) | (_bits(b[:, 16:48], 8) << 4)
    return (d * q.astype(np.float32) - dm).reshape(n, QK_K)


def _q6_k(b: np.ndarray) -> np.ndarray:
    """ql[128] | qh[64] | scales[16] int8 | d f16; w = d*scale * (q - 32), 16 groups of 16 weights.
    Two halves of 128 weights: ql half = 64 bytes (low nibbles give weights 0-63, high nibbles 64-127),
    qh half = 32 bytes whose bit pairs 0-1, 2-3, 4-5, 6-7 give the top 2 bits of weights 0-31, 32-63, ..."""
    n = b.shape[0]
    ql = b[:, :128].reshape(n, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    ql = (ql & 0x0F).reshape(n, 8, 32)
    qh = b[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    qh = (qh & 3).reshape(n, 8, 32)
    q = (ql | (qh << 4)).astype(np.int8) - np.int8(32)
    scales = np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float32)
    d = (_f16(b, 208) * scales).reshape(n, 16, 1)
    return (d * q.reshape(n, 16, 16).astype(np.float32)).reshape(n, QK_K)


_BLOCK_DEQUANT = {
    GGMLType.Q4_0: _q4_0, GGMLType.Q4_1: _q4_1, GGMLType.Q5_0: _q5_0, GGMLType.Q5_1: _q5_1,
    GGMLType.Q8_0: _q8_0, GGMLType.Q2_K: _q2_k, GGMLType.Q3_K: _q3_k, GGMLType.Q4_K: _q4_k,
    GGMLType.Q5_K: _q5_k, GGMLType.Q6_K: _q6_k,
}
_FLOAT_DTYPE = {GGMLType.F32: "<f4", GGMLType.F16: "<f2"}
SUPPORTED_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16, *_BLOCK_DEQUANT)


def dequantize(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...], where: str = "tensor") -> torch.Tensor:
    """Stored bytes (uint8, 1-D) of a tensor of `ggml_type` -> float32 torch tensor of `shape` (torch order)."""
    ggml_type = GGMLType(ggml_type)
    n = 1
    for d in shape:
        n *= d
    block_size, type_size = BLOCK[ggml_type]
    if raw.dtype != np.uint8 or raw.ndim != 1 or raw.size * block_size != n * type_size:
        raise LmforgeError(f"{where}: {raw.size} bytes do not hold {ggml_type.name} data of shape {tuple(shape)}")
    if ggml_type in _FLOAT_DTYPE:
        out = raw.view(_FLOAT_DTYPE[ggml_type]).astype(np.float32)  # astype copies: the map stays read-only
    elif ggml_type == GGMLType.BF16:  # bf16 is the top half of an f32
        out = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    elif ggml_type in _BLOCK_DEQUANT:
        blocks = raw.reshape(-1, type_size)
        out = np.empty((blocks.shape[0], block_size), dtype=np.float32)
        step = max(1, CHUNK_WEIGHTS // block_size)
        for i in range(0, blocks.shape[0], step):
            out[i:i + step] = _BLOCK_DEQUANT[ggml_type](blocks[i:i + step])
    else:
        supported = ", ".join(t.name for t in SUPPORTED_TYPES)
        raise LmforgeError(f"{where}: ggml type {ggml_type.name} cannot be dequantized yet (supported: {supported})")
    return torch.from_numpy(out.reshape(shape))
