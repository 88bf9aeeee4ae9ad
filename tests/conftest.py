import os

# Multi-device behaviour is tested on fake CPU devices; this must be set before jax starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("SDJAX_COMPILATION_CACHE", "off")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from tests.tiny_models import save_tiny_pipeline, save_tiny_upscaler  # noqa: E402


@pytest.fixture(scope="session")
def sd1_folder(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("sd1") / "model", "sd1")


@pytest.fixture(scope="session")
def sd2_folder(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("sd2") / "model", "sd2", seed=1)


@pytest.fixture(scope="session")
def sd1_inpaint_folder(tmp_path_factory):
    """A tiny SD1 inpainting model (9-channel UNet)."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("sd1-inpaint") / "model", "sd1", seed=2,
                              unet_in_channels=9)


@pytest.fixture(scope="session")
def upscaler_folder(tmp_path_factory):
    """A tiny model in the x4 upscaler layout."""
    return save_tiny_upscaler(tmp_path_factory.mktemp("upscaler") / "model")
