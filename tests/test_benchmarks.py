"""Smoke test of the benchmark entry point on the tiny model: it runs, prints every field and
appends a row. No timing thresholds: speed is recorded in benchmarks/RESULTS.md, not tested."""

import os
import subprocess
import sys
from pathlib import Path

from benchmarks.report import FIELDS
from tests.conftest import FAST_COMPILE

ROOT = Path(__file__).resolve().parent.parent


def _fields(stdout: str) -> dict[str, str]:
    """``label  value`` lines back into {label: value} (labels may contain single spaces)."""
    out = {}
    labels = sorted((label for _, label in FIELDS), key=len, reverse=True)
    for line in stdout.splitlines():
        for label in labels:
            if line.startswith(label + "  "):
                out[label] = line[len(label):].strip()
                break
    return out


def test_throughput_runs_on_the_tiny_model_and_records_a_row(tmp_path):
    """With ``--controlnet``: the plain workload plus the ControlNet's inputs, so one run
    covers both (the plain path is the same code without the control image)."""
    results, root = tmp_path / "RESULTS.md", tmp_path / "models"
    # The random model and ControlNet are written here, by the command the benchmark would
    # run in a child process of its own (which would import torch and diffusers once more).
    from benchmarks import models
    models.main(["--shape", "tiny", "--root", str(root)])
    models.main(["--controlnet_for", str(root / f"tiny-{models.VERSION}"), "--root", str(root)])
    # A subprocess, as users run it: the benchmark turns on a persistent compilation cache
    # and changes JAX settings that must not leak into the other tests of this process. One
    # device, compiled as fast as the tests' own (conftest.FAST_COMPILE): the smoke test
    # checks the fields, not the speed, and its compile is most of its time. One torch
    # thread: the other xdist worker keeps the other core busy, and diffusers' two threads
    # spinning against it made its tiny calls 50 times slower (6-9 s instead of 0.12 s).
    env = {**os.environ, "XLA_FLAGS": FAST_COMPILE, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.throughput", "--model", "tiny", "--models_dir",
         str(root), "--size", "32", "--steps", "2", "--repeats", "2",
         "--num_devices", "1", "--no-warm_start", "--results", str(results),
         "--controlnet", "--threads", "1", "--note", "smoke test"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fields = _fields(proc.stdout)
    assert set(fields) == {label for _, label in FIELDS}, proc.stdout

    # Through a random ControlNet made from the tiny UNet: diffusers runs its
    # StableDiffusionControlNetPipeline, and the ControlNet's FLOPs count per evaluation.
    assert fields["model"] == "tiny" and fields["image size"] == "32x32"
    assert fields["ControlNet"] == "random"
    assert "controlnet_0_evaluation" in fields["GFLOP per device call by part"]
    assert fields["UNet evaluations per call"] == "3"  # PNDM: one extra evaluation
    assert fields["warm start s (fresh process to first image)"] == "n/a"  # switched off
    for label in ("cold compile s", "s/batch (median)", "images/s", "UNet steps/s",
                  "GFLOP/image", "diffusers s/batch (median)", "sdjax speedup vs diffusers"):
        assert float(fields[label]) > 0, label
    assert len(fields["s/batch runs"].split()) == 2
    assert "1 torch threads" in fields["diffusers setup"]  # --threads reaches diffusers
    # Both libraries ran the same workload on the same weights: the same pixels.
    assert float(fields["max |pixel| diff vs diffusers"]) < 1e-4
    # CPU: no allocator counters, so no peak memory, batch search or MFU without a peak.
    assert fields["peak device memory"] == fields["max batch per device"] == "n/a"
    assert fields["MFU"] == "n/a"

    row = results.read_text().splitlines()[-1]
    assert row.startswith("| ") and "--model tiny" in row and "smoke test" in row
    assert "tiny + ControlNet (random)" in row
    assert results.read_text().count("| date |") == 1


def test_mid8_is_mid_with_sd15_head_count():
    from benchmarks.models import SHAPES
    from sdjax.models.unet import UNetConfig
    mid, mid8 = SHAPES["mid"].unet, SHAPES["mid8"].unet
    assert mid8.heads_per_level() == UNetConfig.sd15().heads_per_level() == (8, 8, 8, 8)
    assert mid.heads_per_level() != mid8.heads_per_level()
    assert mid8.block_out_channels == mid.block_out_channels
    assert SHAPES["mid8"].vae == SHAPES["mid"].vae and SHAPES["mid8"].text == SHAPES["mid"].text
