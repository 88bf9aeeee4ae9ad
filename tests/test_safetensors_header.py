"""Malformed safetensors headers: each a one-line WeightsError that names the file, raised
when the file is opened (never later, inside numpy or a loader)."""

import json
import struct

import numpy as np
import pytest

from sdjax.weights.errors import WeightsError
from sdjax.weights.safetensors_io import SafetensorsFile

F32 = np.zeros((2, 3), np.float32).tobytes()  # 24 bytes


def _safetensors(path, header, data=F32, length=None):
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)
    return path


def _entry(start=0, end=24, dtype="F32", shape=(2, 3)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [start, end]}


# name -> (writer(tmp_path) -> path, what the message must say)
HEADERS = {
    "json_list": (lambda p: _safetensors(p, [1, 2]), "JSON list instead of an object"),
    "no_data_offsets": (lambda p: _safetensors(p, {"w": {"dtype": "F32", "shape": [2, 3]}}),
                        "has no data_offsets"),
    "shape_not_ints": (lambda p: _safetensors(p, {"w": {**_entry(), "shape": ["2", 3]}}),
                       "shape must be a list"),
    "offsets_not_a_pair": (lambda p: _safetensors(p, {"w": {**_entry(), "data_offsets": 24}}),
                           "data_offsets must be"),
    "entry_not_object": (lambda p: _safetensors(p, {"w": "F32"}), "is not an object"),
    "dtype_not_string": (lambda p: _safetensors(p, {"w": _entry(dtype=4)}),
                         "dtype must be a string"),
    "unknown_dtype": (lambda p: _safetensors(p, {"w": _entry(dtype="F8_E9")}),
                      "unsupported dtype 'F8_E9'"),
    "size_mismatch": (lambda p: _safetensors(p, {"w": _entry(end=20)}), "inconsistent offsets"),
    "out_of_range": (lambda p: _safetensors(p, {"w": _entry(100, 124)}), "out of range"),
    "overlapping": (lambda p: _safetensors(p, {"a": _entry(0, 24), "b": _entry(12, 36)},
                                           data=F32 * 2), "overlap"),
    "truncated": (lambda p: _safetensors(p, {"w": _entry()}, data=F32[:10]), "truncated"),
    "header_past_end": (lambda p: _safetensors(p, {"w": _entry()}, length=10**9),
                        "runs past the end"),
    "invalid_json": (lambda p: _safetensors(p, b"{not json"), "corrupt safetensors header"),
    "metadata_not_strings": (lambda p: _safetensors(p, {"__metadata__": {"a": 1},
                                                         "w": _entry()}), "__metadata__"),
}


@pytest.mark.parametrize("case", sorted(HEADERS))
def test_malformed_safetensors_header_is_one_line_naming_the_file(tmp_path, case):
    write, message = HEADERS[case]
    path = write(tmp_path / "bad.safetensors")
    with pytest.raises(WeightsError) as e:
        SafetensorsFile(path)
    text = str(e.value)
    assert message in text and str(path) in text and "\n" not in text


def test_zero_length_tensors_never_overlap(tmp_path):
    path = _safetensors(tmp_path / "ok.safetensors",
                        {"a": _entry(0, 24), "e": _entry(8, 8, shape=(0,)), "b": _entry(24, 48)},
                        data=F32 * 2)
    assert SafetensorsFile(path)["e"].shape == (0,)
