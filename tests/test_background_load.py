"""from_pretrained(background_load=True): the tensors load while the sampler compiles."""

import threading

import jax
import numpy as np
import pytest

from sdjax.pipeline import StableDiffusionPipeline
from sdjax.weights import loader
from tests.test_adapters import write_kohya_lora

CALL = dict(prompt=["a red circle", "a blue square"], num_inference_steps=2, seed=3,
            output_type="latent")  # the UNet's output: no decoder to compile


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    return write_kohya_lora(tmp_path_factory.mktemp("lora") / "style.safetensors")


@pytest.fixture(scope="module")
def plain(sd1_folder, lora_file):
    """A pipeline loaded at once, and its images with the LoRA merged."""
    pipe = StableDiffusionPipeline.from_pretrained(str(sd1_folder), dtype="float32",
                                                   num_devices=1)
    pipe.load_lora(lora_file, 0.8)
    return pipe, pipe(**CALL).images


def _leaves(pipe) -> list:
    return jax.tree.leaves(pipe.params)


def test_compiles_before_any_tensor_is_read_and_matches_a_plain_load(sd1_folder, plain,
                                                                      lora_file, monkeypatch):
    gate, reads = threading.Event(), []
    read = loader._read

    def held_read(*args):
        assert gate.wait(timeout=120), "the test never opened the gate"
        reads.append(args[1])
        return read(*args)

    monkeypatch.setattr(loader, "_read", held_read)
    pipe = StableDiffusionPipeline.from_pretrained(str(sd1_folder), dtype="float32",
                                                   num_devices=1, background_load=True)
    # Returned, LoRA checked (merged later), and compiled, with every read held at the gate.
    assert pipe.load_lora(lora_file, 0.8) == "style"
    pipe.compile(**CALL)
    assert not reads and pipe.compile_count == 1
    gate.set()
    images = pipe(**CALL).images
    # Same weights, LoRA merged, and the same executable's output.
    np.testing.assert_array_equal(images, plain[1])
    assert pipe.compile_count == 1  # the executable compiled against the shapes was used
    # Every parameter read once, and none left abstract.
    assert len(reads) == len(_leaves(pipe)) == len(_leaves(plain[0]))
    assert all(isinstance(x, jax.Array) for x in _leaves(pipe))


def test_a_network_replaced_after_loading_is_never_read(sd1_folder, monkeypatch):
    reads = []
    read = loader._read

    def counted(*args):
        reads.append(args[1])
        return read(*args)

    monkeypatch.setattr(loader, "_read", counted)
    pipe = StableDiffusionPipeline.from_pretrained(str(sd1_folder), dtype="float32",
                                                   num_devices=1, background_load=True,
                                                   vae=str(sd1_folder / "vae"))
    pipe.wait_for_weights()
    # The folder's own VAE was replaced by vae=: its tensors were checked, never read.
    assert len(reads) == len(_leaves(pipe))


def test_a_failed_read_is_raised_where_the_weights_are_needed(sd1_folder, lora_file,
                                                              monkeypatch):
    def failing(*args):
        raise OSError("read failed: the disk went away")

    monkeypatch.setattr(loader, "_read", failing)
    pipe = StableDiffusionPipeline.from_pretrained(str(sd1_folder), dtype="float32",
                                                   num_devices=1, background_load=True)
    with pytest.raises(OSError, match="disk went away"):
        pipe.wait_for_weights()
    with pytest.raises(OSError, match="disk went away"):  # every time, not just once
        pipe(**CALL)
    with pytest.raises(OSError, match="disk went away"):
        pipe.load_lora(lora_file)  # the merge needs them
