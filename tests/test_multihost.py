"""Multi-host runs for real: two processes joined by jax.distributed (a localhost coordinator,
gloo collectives, 2 fake CPU devices each), started the way a cluster that no launcher
describes starts them (JAX_COORDINATOR_ADDRESS, SDJAX_NUM_PROCESSES, SDJAX_PROCESS_ID).

Both CLIs must produce what one process on one device produces: sdjax.sample the same pixels,
written by the first process only; sdjax.generate the same shard bytes. The reference is one
single-process sdjax.generate run; sample's image i and generate's sample i share their prompt and
their noise key (seed, i), and every run uses 2 images per device per call, so the pixels are
comparable bit for bit.
"""

import io
import json
import os
import re
import socket
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from sdjax.parallel import distributed_arguments

PROMPTS = ["a red circle", "a blue square", "a green cat", "a photo", "a cat on a blue background"]
K = 2  # images per prompt
SAMPLING = ["--steps", "2", "--batch_size", "2", "--seed", "3"]
GENERATE = ["--images_per_prompt", str(K), "--samples_per_shard", "4", *SAMPLING]
TIMEOUT_S = 300  # a hang (a process waiting for its peer forever) fails the test instead
_ENV = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
        "SDJAX_COMPILATION_CACHE": "off"}


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture(scope="module")
def reference(sd1_folder, prompts_file, tmp_path_factory):
    """The dataset of one process on one device: {shard name: tar bytes}. A subprocess like the
    others: XLA:CPU's code for a process of 8 fake devices (this one's) can differ from that
    for 2 in the last bit, and this test is about processes, not that."""
    out = tmp_path_factory.mktemp("reference") / "data"
    r = subprocess.run([sys.executable, "-m", "sdjax.generate", "--model", str(sd1_folder),
                        "--prompts", str(prompts_file), "--outdir", str(out),
                        "--num_devices", "1", *GENERATE],
                       env={**os.environ, **_ENV}, capture_output=True, text=True,
                       timeout=TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-3000:]
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


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


def _run_two_processes(module: str, argv: list[str], cwds) -> list[tuple[int, str, str]]:
    """Run ``python -m module argv`` as processes 0 and 1 of one jax.distributed run."""
    port = _free_port()
    procs = []
    for pid, cwd in enumerate(cwds):
        env = {**os.environ, **_ENV, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
               "SDJAX_NUM_PROCESSES": "2", "SDJAX_PROCESS_ID": str(pid)}
        procs.append(subprocess.Popen([sys.executable, "-m", module, *argv], cwd=cwd, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT_S)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    return results


def test_two_processes_sample_the_single_process_images(sd1_folder, reference, tmp_path):
    # Separate working folders stand for two hosts' disks: only the first may be written.
    cwds = [tmp_path / "host0", tmp_path / "host1"]
    for c in cwds:
        c.mkdir()
    argv = ["--model", str(sd1_folder), "--num_images", str(K), "--outdir", "out", "--grid",
            *SAMPLING]
    for p in PROMPTS:
        argv += ["--prompt", p]
    (_, out0, _), (_, out1, _) = _run_two_processes("sdjax.sample", argv, cwds)

    assert "devices: 4 x cpu" in out0  # one global mesh over both processes' devices
    assert "wrote" not in out1
    assert not (cwds[1] / "out").exists()
    pngs = [f"{i:05d}-3-{i}.png" for i in range(len(PROMPTS) * K)]
    assert sorted(p.name for p in (cwds[0] / "out").iterdir()) == sorted(pngs + ["00000-grid.png"])
    files = [cwds[0] / "out" / name for name in pngs]
    expected = _images(reference)
    for f, want in zip(files, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(f)), want, err_msg=f.name)


def test_two_processes_make_the_single_process_shards(sd1_folder, prompts_file, reference,
                                                      tmp_path):
    out = tmp_path / "data"
    argv = ["--model", str(sd1_folder), "--prompts", str(prompts_file), "--outdir", str(out),
            *GENERATE]
    (_, out0, _), (_, out1, _) = _run_two_processes("sdjax.generate", argv, [tmp_path] * 2)

    # Each process makes its own shards on its own two devices: 0 and 2 here, 1 there.
    assert "wrote 2 shard(s)" in out0 and "wrote 1 shard(s)" in out1
    made = {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}
    assert made.keys() == reference.keys()
    for name in made:
        assert made[name] == reference[name], name
    stats = json.loads((out / "stats.json").read_text())
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
