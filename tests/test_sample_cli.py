"""python -m sdjax.sample: outputs, metadata, multi-device equality and every error case."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sdjax.images import parse_parameters
from sdjax.sample import main


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _pngs(folder):
    return sorted(p for p in folder.glob("*.png") if "grid" not in p.name)


def test_writes_pngs_with_parsable_metadata(sd1_folder, tmp_path, capsys):
    rc, out, err = _run(capsys, "--model", sd1_folder, "--prompt", "a red circle",
                        "--prompt", "a blue square", "--negative_prompt", "green",
                        "--num_images", "2", "--steps", "3", "--guidance_scale", "6.5",
                        "--seed", "42", "--scheduler", "euler", "--num_devices", "1",
                        "--outdir", tmp_path, "--grid")
    assert rc == 0, err
    files = _pngs(tmp_path)
    assert len(files) == 4
    assert (tmp_path / "00000-grid.png").exists()
    assert "compile:" in out and "images/s" in out
    meta = [parse_parameters(Image.open(f).text["parameters"]) for f in files]
    assert [m["prompt"] for m in meta] == ["a red circle"] * 2 + ["a blue square"] * 2
    m = meta[3]
    assert m["negative_prompt"] == "green"
    assert (m["Steps"], m["Sampler"], m["CFG scale"], m["Seed"]) == ("3", "Euler", "6.5", "42")
    assert m["Seed index"] == "3" and m["Size"] == "16x16" and m["Model"] == str(sd1_folder)
    # A second run never overwrites: it numbers on.
    rc, _, _ = _run(capsys, "--model", sd1_folder, "--steps", "2", "--num_devices", "1",
                    "--prompt", "x", "--outdir", tmp_path)
    assert rc == 0 and len(_pngs(tmp_path)) == 5


def test_eight_devices_write_the_same_images_as_one(sd2_folder, tmp_path, capsys):
    """2 prompts x 5 images at one image per device: on 8 devices the second call holds 2
    images and 6 padding rows, none of which is written; every image is the one device's."""
    common = ["--model", sd2_folder, "--prompt", "a cat", "--prompt", "a green photo",
              "--num_images", "5", "--steps", "3", "--batch_size", "1"]
    assert _run(capsys, *common, "--num_devices", "1", "--outdir", tmp_path / "one")[0] == 0
    rc, out, err = _run(capsys, *common, "--num_devices", "8", "--outdir", tmp_path / "eight")
    assert rc == 0, err
    assert "8 x cpu" in out
    one, eight = _pngs(tmp_path / "one"), _pngs(tmp_path / "eight")
    assert len(one) == len(eight) == 10
    for a, b in zip(one, eight, strict=True):
        assert a.name == b.name
        np.testing.assert_array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


@pytest.fixture()
def broken_model(sd1_folder, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(sd1_folder, folder)
    return folder


def _corrupt(folder):
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    return folder


def _drop_vae(folder):
    shutil.rmtree(folder / "vae")
    return folder


@pytest.mark.parametrize("case, extra, message", [
    ("missing model", ["--model", "{tmp}/nowhere"], "model not found"),
    ("no vae", ["--model", "{drop_vae}"], "missing vae/"),
    ("corrupt weights", ["--model", "{corrupt}"], "truncated"),
    ("height", ["--height", "21"], "multiple of 2"),
    ("steps", ["--steps", "0"], "--steps must be at least 1"),
    ("scheduler", ["--scheduler", "plms2"], "unknown --scheduler"),
    ("guidance", ["--guidance_scale", "-1"], "must not be negative"),
    ("outdir is a file", ["--outdir", "{tmp}/file.txt/out"], "is not a folder"),
    ("outdir unwritable", ["--outdir", "/proc/sdjax-out"], "not writable"),
    ("too many prompts", ["--prompts_file", "{many}"], "more than sdjax.sample takes"),
])
def test_errors_are_one_line_and_write_nothing(case, extra, message, sd1_folder, broken_model,
                                               tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    many = tmp_path / "many.txt"
    many.write_text("a cat\n" * 10_001)
    subs = {"{tmp}": str(tmp_path), "{drop_vae}": str(_drop_vae(broken_model))
            if "drop_vae" in " ".join(extra) else "", "{many}": str(many),
            "{corrupt}": str(_corrupt(broken_model)) if "corrupt" in " ".join(extra) else ""}
    argv = ["--model", str(sd1_folder), "--prompt", "a cat", "--steps", "2",
            "--num_devices", "1", "--outdir", str(tmp_path / "out")]
    for a in extra:
        for k, v in subs.items():
            a = a.replace(k, v)
        argv.append(a)
    rc, out, err = _run(capsys, *argv)
    assert rc == 2
    assert message in err, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_real_process_exit_code_and_help(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sdjax.sample", "--model", str(tmp_path / "no"),
                        "--prompt", "a cat",
                        "--outdir", str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.strip().startswith("error: model not found")
    h = subprocess.run([sys.executable, "-m", "sdjax.sample", "--help"], capture_output=True,
                       text=True)
    assert h.returncode == 0 and "--num_devices" in h.stdout and "--prompts_file" in h.stdout
