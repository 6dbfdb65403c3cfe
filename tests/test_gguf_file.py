"""Our GGUF container reader against the ``gguf`` package's own reader, on a file its writer made."""

from __future__ import annotations

import numpy as np
import pytest

from warm_jax.models import gguf_file
from warm_jax.models import pretrained as pt

gguf = pytest.importorskip("gguf")


def _write(path, alignment: int | None = None) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_uint32("t.u32", 7)
    w.add_int32("t.i32", -3)
    w.add_uint64("t.u64", 2**40)
    w.add_float32("t.f32", 0.1)
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "naïve 日本")
    w.add_array("t.strs", ["a", "", "ĠHello", "<|im_end|>"])
    w.add_array("t.ints", [1, 2, 3, 4])
    w.add_array("t.floats", [0.5, -1.25])
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((2, 4)).astype(np.float16))
    q = rng.standard_normal((4, 64)).astype(np.float32)
    w.add_tensor(
        "q8", gguf.quants.quantize(q, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0
    )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("alignment", [None, 64])
def test_reads_what_the_gguf_package_reads(tmp_path, alignment):
    path = tmp_path / "m.gguf"
    _write(path, alignment)
    ours, ref = gguf_file.read(path), gguf.GGUFReader(str(path))
    ref_fields = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert ours.fields == ref_fields  # float32 fields are Python floats of the float32 value in both
    assert ours.fields["t.strs"] == ["a", "", "ĠHello", "<|im_end|>"]
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors] == ["f32", "f16", "q8"]
    for info, t in zip(ours.tensors, ref.tensors):
        data = ours.tensor_data(info)
        assert info.ggml_type == int(t.tensor_type)
        assert data.dtype == t.data.dtype and data.shape == t.data.shape, info.name
        np.testing.assert_array_equal(data, t.data)


def test_bad_files_name_the_file_and_the_fault(tmp_path):
    good = tmp_path / "m.gguf"
    _write(good)
    raw = good.read_bytes()
    cases = {
        "magic.gguf": (b"GGML" + raw[4:], "not a GGUF file"),
        "version.gguf": (raw[:4] + (1).to_bytes(4, "little") + raw[8:], "version 1 is not supported"),
        "header.gguf": (raw[:200], "truncated"),
        "empty.gguf": (b"", "empty file"),
        "tiny.gguf": (b"GG", "not a GGUF file"),
    }
    for name, (content, match) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        # Through the model reader: a PretrainedError that names the file (architecture 'llama' is set).
        with pytest.raises(pt.PretrainedError, match=match) as err:
            pt.read_gguf(path)
        assert name in str(err.value)
    short = tmp_path / "data.gguf"
    short.write_bytes(raw[:-40])
    g = gguf_file.read(short)  # the header is whole; the last tensor's payload is not
    with pytest.raises(gguf_file.GGUFFormatError, match="data.gguf: tensor 'q8' runs past the end of the file"):
        g.tensor_data(g.tensors[-1])
