import os

# Multi-device behaviour is tested on fake CPU devices; this must be set before jax starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("SDJAX_COMPILATION_CACHE", "off")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from tests.tiny_models import save_tiny_pipeline  # noqa: E402


@pytest.fixture(scope="session")
def sd1_folder(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("sd1") / "model", "sd1")


@pytest.fixture(scope="session")
def sd2_folder(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("sd2") / "model", "sd2", seed=1)


@pytest.fixture(scope="session")
def toy_run_env(tmp_path_factory) -> dict[str, str]:
    """Environment variables for the processes that run the bundled toy model outside pytest
    (the installed wheel, the docs' runnable blocks, the notebooks' kernels): one device, and
    one persistent compilation cache for all of them, so a sampler one has compiled the next
    loads instead of compiling again."""
    return {"SDJAX_COMPILATION_CACHE": str(tmp_path_factory.mktemp("jax_cache")),
            "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
