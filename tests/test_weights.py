"""Strict loading: every mismatch is a WeightsError naming the problem."""

import shutil

import numpy as np
import pytest

from sdjax.weights.diffusers_folder import check_pipeline_folder, load_network
from sdjax.weights.errors import WeightsError
from sdjax.weights.files import open_component_weights
from sdjax.weights.resolve import resolve_model
from sdjax.weights.safetensors_io import SafetensorsFile, save_safetensors


@pytest.fixture()
def vae_copy(sd1_folder, tmp_path):
    """A writable copy of the tiny model's vae/ plus its tensors, for corrupting."""
    folder = tmp_path / "model"
    shutil.copytree(sd1_folder / "vae", folder / "vae")
    path = folder / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = {k: np.array(v) for k, v in SafetensorsFile(path).items()}
    return folder, path, tensors


def test_loads_a_component(vae_copy):
    folder, _, _ = vae_copy
    vae = load_network(folder, "vae")
    assert vae.config.latent_channels == 4


def test_missing_key_is_named(vae_copy):
    folder, path, tensors = vae_copy
    del tensors["decoder.conv_in.weight"]
    save_safetensors(tensors, path)
    with pytest.raises(WeightsError, match=r"missing.*decoder\.conv_in\.kernel"):
        load_network(folder, "vae")


def test_unexpected_key_is_named(vae_copy):
    folder, path, tensors = vae_copy
    tensors["decoder.extra_layer.weight"] = np.zeros((3,), np.float32)
    save_safetensors(tensors, path)
    with pytest.raises(WeightsError, match=r"unexpected.*decoder\.extra_layer\.weight"):
        load_network(folder, "vae")


def test_key_for_a_parameter_the_model_lacks_is_named(vae_copy):
    folder, path, tensors = vae_copy
    tensors["decoder.up_blocks.7.resnets.0.conv1.weight"] = np.zeros((1, 1, 3, 3), np.float32)
    save_safetensors(tensors, path)
    with pytest.raises(WeightsError, match=r"up_blocks\.7\.resnets\.0\.conv1"):
        load_network(folder, "vae")


def test_wrong_shape_is_named(vae_copy):
    folder, path, tensors = vae_copy
    tensors["quant_conv.bias"] = np.zeros((3,), np.float32)
    save_safetensors(tensors, path)
    with pytest.raises(WeightsError, match=r"shape.*quant_conv\.bias \(3,\)"):
        load_network(folder, "vae")


def test_truncated_file_is_reported(vae_copy):
    folder, path, _ = vae_copy
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated"):
        load_network(folder, "vae")


def test_garbage_file_is_reported(vae_copy):
    folder, path, _ = vae_copy
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(WeightsError, match="corrupt|truncated"):
        load_network(folder, "vae")


def test_folder_without_unet_is_named(sd1_folder, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(sd1_folder, folder)
    shutil.rmtree(folder / "unet")
    with pytest.raises(WeightsError, match=r"missing unet/"):
        check_pipeline_folder(folder)


def test_fp16_variant_is_preferred_when_asked(vae_copy):
    folder, path, tensors = vae_copy
    half = {k: v.astype(np.float16) for k, v in tensors.items()}
    save_safetensors(half, path.with_name("diffusion_pytorch_model.fp16.safetensors"))
    opened = open_component_weights(folder / "vae", variant="fp16")
    assert next(iter(opened.values())).dtype == np.float16
    assert next(iter(open_component_weights(folder / "vae").values())).dtype == np.float32


def test_bin_weights_load_with_torch(vae_copy):
    import torch
    folder, path, tensors = vae_copy
    path.unlink()
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()},
               folder / "vae" / "diffusion_pytorch_model.bin")
    vae = load_network(folder, "vae")
    np.testing.assert_array_equal(np.asarray(vae.quant_conv.bias[...]), tensors["quant_conv.bias"])


def test_safetensors_roundtrip_bfloat16(tmp_path):
    import ml_dtypes
    x = np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16)
    save_safetensors({"x": x}, tmp_path / "a.safetensors")
    back = SafetensorsFile(tmp_path / "a.safetensors")["x"]
    assert back.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(np.asarray(back, np.float32), np.asarray(x, np.float32))


def test_resolve_errors_are_one_line(tmp_path):
    with pytest.raises(WeightsError, match="model not found"):
        resolve_model(str(tmp_path / "nope"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(WeightsError, match="not a model"):
        resolve_model(str(tmp_path / "notes.txt"))
    (tmp_path / "w.safetensors").write_bytes(b"")
    assert resolve_model(str(tmp_path / "w.safetensors")) == tmp_path / "w.safetensors"


def test_hub_id_offline_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError) as e:
        resolve_model("nobody-here/not-a-real-model-sdjax")
    assert "\n" not in str(e.value)
    assert "no connection" in str(e.value) and "--model" in str(e.value)


def test_hub_id_is_asked_for_once_per_process(monkeypatch, tmp_path):
    """A CLI resolves --model several times; online, each snapshot_download is a hub request."""
    import huggingface_hub

    from sdjax.weights import resolve
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append(repo_id)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    resolve.snapshot.cache_clear()
    try:
        assert resolve_model("someone/a-model") == resolve_model("someone/a-model") == tmp_path
        resolve_model("someone/another-model")
        assert calls == ["someone/a-model", "someone/another-model"]
    finally:
        resolve.snapshot.cache_clear()
