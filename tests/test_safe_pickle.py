"""The restricted unpickler: torch checkpoints come back as lazily read numpy tensors, and a
hostile pickle is refused before anything in it runs."""

import io
import sys
import types
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch

from sdjax.weights.errors import WeightsError
from sdjax.weights.safe_pickle import LazyTensor, TorchCheckpoint
from tests.pickles import hostile_checkpoint, payload


def test_rebuilds_tensors_lazily_with_their_dtypes_and_layouts(tmp_path, monkeypatch):
    base = torch.arange(24, dtype=torch.float32)
    sd = {"f32": torch.randn(3, 4), "f16": torch.randn(5).half(),
          "bf16": torch.randn(2, 3).bfloat16(), "i64": torch.arange(5),
          "transposed": torch.randn(4, 3).t(), "slice": base[2:7], "strided": base[::3],
          "param": torch.nn.Parameter(torch.ones(2)), "scalar": torch.tensor(3.0)}
    # Full Lightning checkpoints carry a callback object: it becomes inert, nothing runs.
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self):
            self.best = torch.tensor(0.5)

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module.__name__, "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd, "global_step": 42, "callbacks": {"cb": ModelCheckpoint()}},
               path)

    ckpt = TorchCheckpoint(path)
    assert ckpt.extras["global_step"] == 42
    assert sorted(ckpt) == sorted(sd)
    for name, tensor in sd.items():
        assert ckpt.shape(name) == tuple(tensor.shape)
        got = ckpt[name]
        if tensor.dtype == torch.bfloat16:
            assert got.dtype == ml_dtypes.bfloat16
            want = tensor.float().numpy()
        else:
            want = tensor.detach().numpy()
        np.testing.assert_array_equal(np.asarray(got, want.dtype), want, err_msg=name)
    assert isinstance(ckpt._tensors["f32"], LazyTensor)  # nothing read until asked


def test_legacy_and_non_checkpoint_files_are_named(tmp_path):
    legacy = tmp_path / "old.pt"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(WeightsError, match="pre-1.6 format"):
        TorchCheckpoint(legacy)
    (tmp_path / "text.ckpt").write_text("hello")
    with pytest.raises(WeightsError, match="not a PyTorch checkpoint"):
        TorchCheckpoint(tmp_path / "text.ckpt")
    with zipfile.ZipFile(tmp_path / "other.ckpt", "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(WeightsError, match="not a PyTorch checkpoint"):
        TorchCheckpoint(tmp_path / "other.ckpt")


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
    path = hostile_checkpoint(tmp_path / "model.ckpt",
                              payload(module, name, arg.format(marker=marker)))
    with pytest.raises(WeightsError, match=rf"refused.*{module}\.{name}"):
        TorchCheckpoint(path)
    assert not marker.exists()


def test_the_payload_would_have_run_without_the_guard(tmp_path):
    """The hostile pickle is real: the standard unpickler runs it (so the test above can
    fail)."""
    import pickle
    marker = tmp_path / "payload-ran"
    pickle.load(io.BytesIO(payload("builtins", "eval", f"open('{marker}', 'w')")))
    assert marker.exists()
