"""Bad single files and VAEs through sdjax.sample: one line on stderr, exit code 2, no
traceback, nothing written."""

import zipfile

import numpy as np
import pytest

from sdjax import sample
from sdjax.weights.safetensors_io import SafetensorsFile
from tests.pickles import hostile_checkpoint, payload


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


def _embedding_pt(p):
    import torch
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.zeros(2, 768)},
                "name": "style", "step": 3000}, p)
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
    "embedding_pt": (_embedding_pt, [], "textual-inversion embedding"),
    "lone_vae": (_lone_vae, [], "a VAE alone"),
    "zip_not_torch": (_not_torch_zip, [], "not a PyTorch checkpoint"),
    "legacy_torch": (_legacy, [], "pre-1.6 format"),
    "hostile": (lambda p: hostile_checkpoint(p, payload("os", "system", "true")), [], "os.system"),
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
    ext = ".pt" if case in ("legacy_torch", "embedding_pt") else ".ckpt" if case in (
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
