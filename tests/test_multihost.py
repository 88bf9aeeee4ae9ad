"""Multi-host runs for real: two processes joined by jax.distributed (a localhost coordinator,
gloo collectives, 2 fake CPU devices each), started the way a cluster that no launcher
describes starts them (JAX_COORDINATOR_ADDRESS, SDJAX_NUM_PROCESSES, SDJAX_PROCESS_ID).

Both CLIs must produce what one process of 2 devices produces, bit for bit: sdjax.generate
(text to image) the same shard bytes; sdjax.sample the same pixels, written by the first
process only, for inpainting with a ControlNet (the image, the mask, the blend and the control
image go through the two-process program too), the x4 upscaler and SDXL. Each process runs
``generate.main`` and then ``sample.main`` once per task (what ``python -m`` runs), so the
four runs cost one start-up and one jax.distributed join; the reference, one process of 2
devices, runs the same and starts together with the two-process run. Every run uses 2 images
per device per call.
The sampler is Euler a, whose fresh noise each step is drawn inside the loop.
"""

import io
import json
import os
import re
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdjax.parallel import distributed_arguments
from tests.conftest import FAST_COMPILE

PROMPTS = ["a red circle", "a blue square", "a green cat", "a photo", "a cat on a blue background"]
K = 2  # images per prompt
SAMPLING = ["--steps", "2", "--batch_size", "2", "--seed", "3", "--scheduler", "euler_a"]
GENERATE = ["--images_per_prompt", str(K), "--samples_per_shard", "4", *SAMPLING]
TIMEOUT_S = 300  # a hang (a process waiting for its peer forever) fails the test instead
_ENV = {"XLA_FLAGS": f"--xla_force_host_platform_device_count=2 {FAST_COMPILE}",
        "JAX_PLATFORMS": "cpu", "SDJAX_COMPILATION_CACHE": "off"}


# ``python -m MODULE ARGV...`` for each [MODULE, ARGV] of the JSON list given, in one process;
# it stops at the first run that fails, with its exit status.
_RUNS = ("import importlib, json, sys\n"
         "for module, argv in json.loads(sys.argv[1]):\n"
         "    if rc := importlib.import_module(module).main(argv):\n        sys.exit(rc)")
# sdjax.sample's tasks: their prompts and the side of the images they write (the x4
# upscaler makes 32x32 of an 8x8 input; the tiny SD 1.x and SDXL models' default is 16).
SAMPLE_TASKS = {"inpaint": (PROMPTS, 16), "upscale": (PROMPTS[:2], 32),
                "sdxl": (PROMPTS[:2], 16)}


@pytest.fixture(scope="module")
def runs(sd1_folder, sd1_controlnets, upscaler_folder, sdxl_folder, tmp_path_factory):
    """Start the single-process reference and the two-process run at once, then wait for
    both: each runs sdjax.generate, then sdjax.sample's three tasks. Returns the folder and
    {run: [(returncode, stdout, stderr) per process]}."""
    tmp = tmp_path_factory.mktemp("multihost")
    prompts = tmp / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    model = ["--model", str(sd1_folder)]
    generate = [*model, "--prompts", str(prompts), *GENERATE]
    # Separate working folders stand for two hosts' disks: only the first may be written
    # (sdjax.sample's --outdir is relative). sdjax.generate's dataset folder stands for
    # storage both hosts write: each process writes its own shards.
    hosts = [tmp / "host0", tmp / "host1"]
    for h in hosts:
        h.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), np.uint8)).save(tmp / "image.png")
    mask = np.zeros((16, 16), np.uint8)
    mask[:, 8:] = 255  # repaint the right half
    Image.fromarray(mask).save(tmp / "mask.png")
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)).save(tmp / "low.png")
    sample = {"inpaint": [*model, "--grid", "--image", str(tmp / "image.png"), "--mask",
                          str(tmp / "mask.png"), "--controlnet", str(sd1_controlnets[0])],
              "upscale": ["--model", str(upscaler_folder), "--image", str(tmp / "low.png")],
              "sdxl": ["--model", str(sdxl_folder)]}
    for task, (prompts, _) in SAMPLE_TASKS.items():
        sample[task] += ["--num_images", str(K), *SAMPLING]
        for prompt in prompts:
            sample[task] += ["--prompt", prompt]

    def all_runs(dataset: Path, outdir: str, *extra: str) -> str:
        return json.dumps([["sdjax.generate", [*generate, "--outdir", str(dataset), *extra]]]
                          + [["sdjax.sample", [*argv, "--outdir", f"{outdir}/{task}", *extra]]
                             for task, argv in sample.items()])
    # The reference is a subprocess like the others: XLA:CPU compiles the same program
    # differently by the process's device count (outer_dimension_partitions in its HLO), so
    # a process of 8 fake devices (pytest's) rounds differently from one of 2, and this test
    # is about processes, not that. It runs on 2 devices, so it compiles the partitioned
    # per-device program the two-process runs compile.
    started = {
        "reference": [_start([all_runs(tmp / "reference", "sample_reference", "--num_devices",
                                       "2")], tmp, {})],
        "two processes": _start_pair([all_runs(tmp / "data", "out")], hosts),
    }
    results = {}
    try:
        for name, procs in started.items():
            results[name] = [(*p.communicate(timeout=TIMEOUT_S), p.returncode) for p in procs]
    finally:
        for p in (p for procs in started.values() for p in procs):
            if p.poll() is None:
                p.kill()
                p.wait()
    return tmp, {name: [(rc, out, err) for out, err, rc in r] for name, r in results.items()}


def _start(argv: list[str], cwd: Path, env: dict) -> subprocess.Popen:
    """The runs of ``argv[0]`` (:data:`_RUNS`) in a process of 2 fake devices."""
    return subprocess.Popen([sys.executable, "-c", _RUNS, *argv], cwd=cwd,
                            env={**os.environ, **_ENV, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _start_pair(argv: list[str], cwds: list[Path]) -> list[subprocess.Popen]:
    """:func:`_start` as processes 0 and 1 of one jax.distributed run."""
    port = _free_port()
    return [_start(argv, cwd, {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                               "SDJAX_NUM_PROCESSES": "2", "SDJAX_PROCESS_ID": str(i)})
            for i, cwd in enumerate(cwds)]


def _outputs(runs, name: str) -> list[str]:
    """The run's stdout per process, after checking that every process succeeded."""
    for rc, _, err in runs[1][name]:
        assert rc == 0, f"{name}: {err[-3000:]}"
    return [out for _, out, _ in runs[1][name]]


def _tars(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


def _images(tars: dict[str, bytes]) -> list[np.ndarray]:
    """The dataset's images in sample order."""
    images = {}
    for data in tars.values():
        with tarfile.open(fileobj=io.BytesIO(data)) as t:
            for m in t.getmembers():
                if m.name.endswith(".png"):
                    images[int(m.name.split(".")[0])] = np.asarray(
                        Image.open(io.BytesIO(t.extractfile(m).read())))
    return [images[i] for i in sorted(images)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("task", SAMPLE_TASKS)
def test_two_processes_sample_the_single_process_images(runs, task):
    _outputs(runs, "reference")
    out0, out1 = _outputs(runs, "two processes")
    tmp = runs[0]
    assert out0.count("devices: 4 x cpu") == 3  # one global mesh over both processes' devices
    assert "file(s)" not in out1  # only the first process writes images
    assert not (tmp / "host1" / "out").exists()
    made, reference = tmp / "host0" / "out" / task, tmp / "sample_reference" / task
    prompts, side = SAMPLE_TASKS[task]
    pngs = [f"{i:05d}-3-{i}.png" for i in range(len(prompts) * K)]
    written = sorted(p.name for p in made.iterdir())
    assert written == sorted(pngs + (["00000-grid.png"] if task == "inpaint" else []))
    assert sorted(p.name for p in reference.iterdir()) == written
    for name in pngs:
        got = Image.open(made / name)
        parameters = got.text["parameters"]
        if task == "inpaint":  # it inpainted, with the ControlNet
            assert "Mask blur" in parameters and "ControlNet 0" in parameters, name
        want = np.asarray(Image.open(reference / name))
        assert got.size == (side, side), name
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"{task} {name}")


def test_two_processes_make_the_single_process_shards(runs):
    _outputs(runs, "reference")
    out0, out1 = _outputs(runs, "two processes")
    tmp = runs[0]
    # Each process makes its own shards on its own two devices: 0 and 2 here, 1 there.
    assert "wrote 2 shard(s)" in out0 and "wrote 1 shard(s)" in out1
    made, reference = _tars(tmp / "data"), _tars(tmp / "reference")
    assert made.keys() == reference.keys() == {"00000.tar", "00001.tar", "00002.tar"}
    for name in made:
        assert made[name] == reference[name], name
    stats = json.loads((tmp / "data" / "stats.json").read_text())
    assert stats["complete"] and sorted(j["job_index"] for j in stats["jobs"]) == [0, 1]


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"SDJAX_DISTRIBUTED": "1"}, {}),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"}, {}),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234", "SDJAX_NUM_PROCESSES": "4",
      "SDJAX_PROCESS_ID": "3"},
     {"coordinator_address": "10.0.0.2:1234", "num_processes": 4, "process_id": 3}),
])
def test_distributed_arguments(env, expected):
    assert distributed_arguments(env) == expected


@pytest.mark.parametrize("env, message", [
    ({"SDJAX_NUM_PROCESSES": "2", "SDJAX_PROCESS_ID": "0"}, "JAX_COORDINATOR_ADDRESS"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "SDJAX_NUM_PROCESSES": "2"}, "set both"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "SDJAX_NUM_PROCESSES": "two", "SDJAX_PROCESS_ID": "0"},
     "must be integers"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "SDJAX_NUM_PROCESSES": "2", "SDJAX_PROCESS_ID": "2"},
     "must be in [0, SDJAX_NUM_PROCESSES)"),
    ({"SDJAX_DISTRIBUTED": "1", "SDJAX_NUM_PROCESSES": "2", "SDJAX_PROCESS_ID": "0"},
     "need JAX_COORDINATOR_ADDRESS"),
])
def test_bad_process_descriptions_are_one_line_errors(env, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        distributed_arguments(env)


def test_a_bad_process_description_is_a_one_line_cli_error(tmp_path, monkeypatch, capsys):
    from sdjax import sample

    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    monkeypatch.delenv("SDJAX_DISTRIBUTED", raising=False)
    monkeypatch.setenv("SDJAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("SDJAX_PROCESS_ID", "0")
    assert sample.main(["--outdir", str(tmp_path / "out"), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: SDJAX_NUM_PROCESSES is set but JAX_COORDINATOR_ADDRESS")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
