"""The built wheel, not the checkout: it carries the toy model and the CLIP vocabulary, and
installed into a fresh virtual environment (with this machine's site-packages for the
dependencies, so nothing is downloaded) it runs the README's first command from a folder
outside the checkout."""

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import sdjax

ROOT = Path(__file__).parent.parent
TIMEOUT_S = 300


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the sources, so the build writes nothing into the checkout."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "sdjax", src / "sdjax",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                        "--no-build-isolation", "-q", "-w", str(tmp / "dist"), str(src)],
                       capture_output=True, text=True, timeout=TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-3000:]
    (path,) = (tmp / "dist").glob("sdjax-*.whl")
    return path


def test_wheel_contents(wheel):
    assert wheel.name == f"sdjax-{sdjax.__version__}-py3-none-any.whl"  # one version source
    names = set(zipfile.ZipFile(wheel).namelist())
    toy = ROOT / "sdjax" / "assets" / "toy"
    bundled = {p.relative_to(ROOT).as_posix() for p in toy.rglob("*") if p.is_file()}
    assert bundled <= names, sorted(bundled - names)
    assert {"sdjax/assets/toy/tokenizer/vocab.json",
            "sdjax/assets/toy/tokenizer/merges.txt"} <= names
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "configs/"))]


def test_installed_wheel_runs_the_readme_command(wheel, tmp_path, toy_run_env):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                    str(venv)], check=True, timeout=TIMEOUT_S)
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                        "install", "--no-deps", "-q", str(wheel)],
                       capture_output=True, text=True, timeout=TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-3000:]

    # The README's first command is "install && run": run its second half, as a user whose
    # PATH starts with the environment, in a folder that is not the checkout.
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    first = re.search(r"^```bash\n(.*?)^```", readme, re.MULTILINE | re.DOTALL).group(1)
    command = first.split("&&")[-1].strip()
    assert command.startswith("python -m sdjax.sample")
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(toy_run_env, PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}")
    where = subprocess.run(["python", "-c", "import sdjax; print(sdjax.__file__)"], cwd=work,
                           env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout + where.stderr
    r = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True,
                       text=True, timeout=TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [p.name for p in (work / "outputs").iterdir()] == ["00000-0-0.png"]
