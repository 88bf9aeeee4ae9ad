import contextlib
import os

# Multi-device behaviour is tested on fake CPU devices; this must be set before jax starts.
# The tests compile far more than they run (tiny models, a few steps), so XLA:CPU compiles
# for speed of compiling: its LLVM backend optimisation is off, which halves the suite's time
# (tests/test_pipeline.py: 189 s of CPU at the default level, 98 s at 0), and fusions go
# through XLA:CPU's older LLVM IR emitters instead of its MLIR fusion emitters, which takes
# 40% off what is left of XLA's compile time (8 tiny SD1 samplers, 3 schedulers and img2img
# on 1 and 8 devices: 19-22 s of XLA compile -> 12 s; tests/test_tasks.py: 101-127 s of CPU ->
# 75 s). Neither changes what the tests rely on (no fast-math either way; the images move by
# ~3e-6, far inside the parity tolerances, and the sdjax-vs-sdjax checks compare programs
# compiled alike). XLA:CPU also splits each program's LLVM module into parts it generates
# code for in parallel; at optimisation level 0 the split made a one-device program round
# differently from the partitioned program of 2+ devices (up to 9.2e-6 in [0, 1] pixels:
# Euler a and the other samplers that draw noise in the loop, the inpainting blend, the
# upscaler, ControlNet at 2 images per device), so the tests keep one part, and those
# programs agree bitwise as they do under XLA's defaults (docs/tpu-gpu.md#reproducibility).
# One part compiles no slower on a 2-core machine (six tiny SD 1.x programs: 10.5 s of XLA
# compile against 10.7 s). The benchmarks and users compile with XLA's defaults.
# (Should a jaxlib drop one of these flags, XLA refuses to start: drop it here too.)
FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false "
                "--xla_cpu_parallel_codegen_split_count=1")
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("SDJAX_COMPILATION_CACHE", "off")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The oracles (diffusers, k-diffusion) run tiny torch models whose ops are far too small to
# split over threads: with torch's default of one OpenMP thread per core, each xdist worker's
# threads spin against the other worker's, and a tiny diffusers call costs 12.5 s of CPU
# instead of 0.5 s (8 steps, 32x32, measured on this 2-core machine while it was busy).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import atexit  # noqa: E402
import hashlib  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

from tests.tiny_models import (  # noqa: E402
    save_tiny_controlnet,
    save_tiny_pipeline,
    save_tiny_sdxl,
    save_tiny_sdxl_refiner,
    save_tiny_upscaler,
)


def _compilation_cache() -> None:
    """One persistent compilation cache for the test run's pytest processes (the xdist
    workers share it), in a fresh folder removed at exit: the test modules build the same
    tiny models and compile many of the same programs, and a program compiled once loads
    from the cache after that. The first process of the run (pytest, or xdist's controller)
    makes the folder and hands it down in ``SDJAX_TEST_JAX_CACHE``; each process uses the
    subfolder of its XLA flags. JAX keys an entry by the program, its compile options and
    XLA's flags, but not by ``--xla_force_host_platform_device_count``, and the fake-device
    count of a process changes XLA:CPU's code (docs/tpu-gpu.md#reproducibility): processes
    with other flags must not share entries. So what loads is what the compile would make;
    the tests that count compiles count sdjax's own, which a cache hit does not change. A
    size limit turns on JAX's file lock, so no process reads an entry half-written.
    ``SDJAX_TEST_COMPILATION_CACHE=off`` compiles everything."""
    if os.environ.get("SDJAX_TEST_COMPILATION_CACHE", "").lower() in ("0", "off", "false"):
        return
    root = os.environ.get("SDJAX_TEST_JAX_CACHE")
    if not root:
        root = os.environ["SDJAX_TEST_JAX_CACHE"] = tempfile.mkdtemp(
            prefix="sdjax-test-jax-cache-")
        atexit.register(shutil.rmtree, root, ignore_errors=True)
    flags = hashlib.sha256(os.environ.get("XLA_FLAGS", "").encode()).hexdigest()[:16]
    jax.config.update("jax_compilation_cache_dir", os.path.join(root, flags))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_compilation_cache_max_size", 1 << 40)


_compilation_cache()


@contextlib.contextmanager
def optimized_compiles():
    """Programs compiled inside get XLA's default LLVM optimisation (level 3) instead of the
    suite's FAST_COMPILE level 0: for the few tests that run far longer than they compile.
    The toy's 192-image accuracy run: 60 s of CPU at level 0, 46 s at level 3 (its guided
    96-image call runs in 9.5 s instead of 26 s; the compile takes a few seconds longer)."""
    lowered = jax.stages.Lowered
    original = lowered.compile

    def compile(self, compiler_options=None, **kwargs):
        options = {"xla_backend_optimization_level": 3, **(compiler_options or {})}
        return original(self, options, **kwargs)

    lowered.compile = compile
    try:
        yield
    finally:
        lowered.compile = original


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: one worker per core, at most 4 (memory, and little left to split)."""
    return max(1, min(os.cpu_count() or 1, 4))


# The test files that take longest, longest first (summed durations of a full run on 2
# cores). Files go to the workers in this order, then the rest in collection order, so no
# worker is still in a long file while the others have run out of work. pyproject's addopts
# turn off xdist's own order (most tests first), which put some of the longest files last.
# Keep the list roughly right when a file's cost changes a lot; its order is not a contract.
LONGEST_FILES = (
    "test_train.py", "test_sdxl.py", "test_tasks.py", "test_controlnet.py",
    "test_sample_cli.py", "test_pipeline.py",
    "test_guidance.py", "test_upscale.py", "test_multihost.py", "test_toy.py",
    "test_sdxl_handoff_cli.py", "test_single_file.py", "test_serve.py", "test_notebooks.py",
    "test_generate.py", "test_sdxl_refiner.py", "test_benchmarks.py", "test_denoiser_seam.py",
    "test_sdxl_adapters.py", "test_tiling_hires.py", "test_webui_samplers.py",
    "test_noise.py", "test_prompt_editing.py",
    "test_unet.py", "test_sample_tasks_cli.py", "test_docs.py", "test_schedulers.py",
    "test_sdxl_single_file.py", "test_adapters.py", "test_wheel.py",
    "test_single_file_errors.py", "test_from_png.py",
)


def pytest_collection_modifyitems(items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: keeps the rest


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
    one persistent compilation cache for all of them (not the pytest processes': their
    fake-device count differs, :func:`_compilation_cache`), so a sampler one has compiled
    the next loads instead of compiling again."""
    return {"SDJAX_COMPILATION_CACHE": str(tmp_path_factory.mktemp("jax_cache")),
            "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count=1 {FAST_COMPILE}"}


class SingleFiles(dict):
    """kind -> (diffusers folder, the same model as a CompVis single .safetensors written by
    sdjax); ``params[kind]`` holds sdjax's float32 parameters loaded from the folder."""
    params: dict


@pytest.fixture(scope="session")
def single_files(tmp_path_factory):
    """Tiny SD1.x/SD2.x-style models with the full SD block structure, as folders and as
    single files."""
    from sdjax.pipeline import StableDiffusionPipeline
    root = tmp_path_factory.mktemp("single")
    out = SingleFiles()
    out.params = {}
    for seed, kind in enumerate(("sd1", "sd2")):
        folder = save_tiny_pipeline(root / kind, kind, seed=10 + seed, full=True)
        pipe = StableDiffusionPipeline.from_pretrained(str(folder), dtype="float32",
                                                       num_devices=1)
        out[kind] = (folder, pipe.save_single_file(root / f"{kind}.safetensors"))
        out.params[kind] = pipe.params
    return out


@pytest.fixture(scope="session")
def sd1_inpaint_folder(tmp_path_factory):
    """A tiny SD1 inpainting model (9-channel UNet)."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("sd1-inpaint") / "model", "sd1", seed=2,
                              unet_in_channels=9)


@pytest.fixture(scope="session")
def upscaler_folder(tmp_path_factory):
    """A tiny model in the x4 upscaler layout."""
    return save_tiny_upscaler(tmp_path_factory.mktemp("upscaler") / "model")


@pytest.fixture(scope="session")
def sdxl_folder(tmp_path_factory):
    """A tiny SDXL base model (two text encoders, text_time added conditioning)."""
    return save_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "model")[0]


@pytest.fixture(scope="session")
def sdxl_refiner_folder(tmp_path_factory):
    """A tiny SDXL refiner (text_encoder_2 only, aesthetic-score time ids), sharing the VAE and
    second text encoder of ``sdxl_folder``'s base."""
    return save_tiny_sdxl_refiner(tmp_path_factory.mktemp("sdxl-refiner") / "model")[0]


@pytest.fixture(scope="session")
def sd1_controlnets(tmp_path_factory, sd1_folder):
    """Two tiny random diffusers ControlNetModel folders made from ``sd1_folder``'s UNet."""
    root = tmp_path_factory.mktemp("sd1-controlnets")
    return [save_tiny_controlnet(root / f"cn{k}", sd1_folder, seed=30 + k) for k in range(2)]


@pytest.fixture(scope="session")
def sdxl_controlnet(tmp_path_factory, sdxl_folder):
    """A tiny random SDXL ControlNet (added text/time conditioning) from ``sdxl_folder``'s UNet."""
    return save_tiny_controlnet(tmp_path_factory.mktemp("sdxl-controlnet") / "cn", sdxl_folder,
                                seed=40)
