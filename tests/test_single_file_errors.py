"""Bad single files and VAEs: one line on stderr, exit code 2, no traceback, nothing written;
a hostile pickle is refused before anything in it runs."""

import io
import json
import struct
import zipfile

import numpy as np
import pytest

from sdjax import sample
from sdjax.weights.errors import WeightsError
from sdjax.weights.safe_pickle import TorchCheckpoint
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


def _pickle_zip(path, pickle_bytes: bytes):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        z.writestr("archive/version", "3\n")
    return path


def _payload(module: str, name: str, arg: str) -> bytes:
    """A protocol-0 pickle that calls module.name(arg): what a hostile .ckpt does."""
    return f"c{module}\n{name}\n(V{arg}\ntR.".encode()


@pytest.mark.parametrize("module,name,arg", [
    ("os", "system", "touch {marker}"),
    ("posix", "system", "touch {marker}"),
    ("builtins", "eval", "open('{marker}', 'w')"),
    ("builtins", "exec", "open('{marker}', 'w')"),
    ("subprocess", "Popen", "touch {marker}"),
    ("torch", "load", "{marker}"),
])
def test_hostile_pickle_is_refused_and_never_runs(tmp_path, module, name, arg):
    marker = tmp_path / "payload-ran"
    path = _pickle_zip(tmp_path / "model.ckpt", _payload(module, name, arg.format(marker=marker)))
    with pytest.raises(WeightsError, match=rf"refused.*{module}\.{name}"):
        TorchCheckpoint(path)
    assert not marker.exists()


def test_the_payload_would_have_run_without_the_guard(tmp_path):
    """The hostile pickle is real: the standard unpickler runs it (so the test above can
    fail)."""
    import pickle
    marker = tmp_path / "payload-ran"
    pickle.load(io.BytesIO(_payload("builtins", "eval", f"open('{marker}', 'w')")))
    assert marker.exists()


def _cli(capsys, tmp_path, *argv):
    outdir = tmp_path / "out"
    rc = sample.main([*map(str, argv), "--prompt", "x", "--outdir", str(outdir)])
    err = capsys.readouterr().err
    return rc, err, outdir


def _lora(p):
    from safetensors.numpy import save_file
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight":
               np.zeros((4, 8), np.float32)}, str(p))
    return p


def _embedding(p):
    from safetensors.numpy import save_file
    save_file({"emb_params": np.zeros((2, 768), np.float32)}, str(p))
    return p


def _lone_vae(p, single_files):
    from safetensors.numpy import save_file
    full = SafetensorsFile(single_files["sd1"][1])
    save_file({k.split(".", 1)[1]: np.array(full[k]) for k in full
               if k.startswith("first_stage_model.")}, str(p))
    return p


def _edited(p, single_files, edit):
    from sdjax.weights.safetensors_io import save_safetensors
    full = SafetensorsFile(single_files["sd1"][1])
    tensors = {k: np.array(full[k]) for k in full}
    edit(tensors)
    save_safetensors(tensors, p)
    return p


def _legacy(p):
    import torch
    torch.save({"w": torch.zeros(2)}, p, _use_new_zipfile_serialization=False)
    return p


def _not_torch_zip(p):
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("readme.txt", "hello")
    return p


MODEL_CASES = {
    "lora": (_lora, [], "a LoRA"),
    "embedding": (_embedding, [], "textual-inversion embedding"),
    "lone_vae": (_lone_vae, [], "a VAE alone"),
    "zip_not_torch": (_not_torch_zip, [], "not a PyTorch checkpoint"),
    "legacy_torch": (_legacy, [], "pre-1.6 format"),
    "hostile": (lambda p: _pickle_zip(p, _payload("os", "system", "true")), [], "os.system"),
    "missing_tensor": (lambda p, sf: _edited(p, sf, lambda t: t.pop(
        "model.diffusion_model.out.2.weight")), ["config"], "conv_out.kernel"),
    "misshapen_tensor": (lambda p, sf: _edited(p, sf, lambda t: t.update(
        {"first_stage_model.quant_conv.bias": np.zeros(3, np.float32)})), ["config"],
        "quant_conv.bias (3,)"),
    "stray_tensor": (lambda p, sf: _edited(p, sf, lambda t: t.update(
        {"something_else.weight": np.zeros(3, np.float32)})), ["config"],
        "something_else.weight"),
    "nonstandard_without_config": (lambda p, sf: _edited(p, sf, lambda t: None), [],
                                   "match no standard family"),
    "unknown_preset": (lambda p, sf: _edited(p, sf, lambda t: None), ["preset"],
                       "neither a preset"),
    "full_model_as_vae": (lambda p, sf: sf["sd1"][1], ["config", "vae"],
                          "a full model, not a VAE"),
    "lora_as_vae": (lambda p, sf: sf["sd1"][1], ["config", "lora_vae"], "not a VAE: a LoRA"),
    "missing_vae": (lambda p, sf: sf["sd1"][1], ["config", "missing_vae"], "VAE not found"),
    "missing_model": (lambda p: p.parent / "nope.safetensors", [], "model not found"),
}


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_bad_model_files_through_the_cli(single_files, tmp_path, capsys, case):
    make, extras, message = MODEL_CASES[case]
    ext = ".pt" if case == "legacy_torch" else ".ckpt" if case in (
        "zip_not_torch", "hostile") else ".safetensors"
    target = tmp_path / f"model{ext}"
    path = make(target, single_files) if make.__code__.co_argcount == 2 else make(target)
    argv = ["--model", path]
    if "config" in extras:
        argv += ["--config", single_files["sd1"][0]]
    if "preset" in extras:
        argv += ["--config", "sd99"]
    if "vae" in extras:
        argv += ["--vae", single_files["sd1"][1]]
        argv[1] = single_files["sd1"][1]
    if "lora_vae" in extras:
        argv += ["--vae", _lora(tmp_path / "lora.safetensors")]
    if "missing_vae" in extras:
        argv += ["--vae", tmp_path / "no-vae.safetensors"]
    rc, err, outdir = _cli(capsys, tmp_path, *argv)
    assert rc == 2, err
    assert message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not outdir.exists()
