"""The built wheel, not the checkout: it carries the toy model and the CLIP vocabulary, and
installed into a fresh virtual environment (which borrows the running interpreter's
site-packages for the dependencies, so nothing is downloaded) it runs the README's first command
from a folder outside the checkout."""

import os
import re
import shutil
import site
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


def running_site_dirs() -> list[str]:
    """The running interpreter's site-packages folders, in its search order. Not the whole of
    sys.path: that also holds the checkout (pytest's rootdir, python -m's cwd) and the editable
    install's path hook, either of which would let the checkout stand in for the wheel."""
    dirs = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE
                                     else [])
    wanted = {os.path.realpath(d) for d in dirs}
    return [p for p in sys.path if p and os.path.realpath(p) in wanted and os.path.isdir(p)]


def test_installed_wheel_runs_the_readme_command(wheel, tmp_path, toy_run_env):
    # Not --system-site-packages: from inside a virtual environment (the README's way) that
    # gives the base interpreter's site-packages, where the dependencies usually are not.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=TIMEOUT_S)
    python = str(venv / "bin" / "python")
    # Installed before the environment sees the running interpreter's packages, so pip does not
    # meet the (editable) sdjax installed there.
    r = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install",
                        "--no-deps", "-q", str(wheel)],
                       capture_output=True, text=True, timeout=TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-3000:]
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True, capture_output=True, text=True, timeout=TIMEOUT_S).stdout.strip()
    borrowed = running_site_dirs()
    assert borrowed, sys.path
    # Plain folder lines, after the environment's own site-packages: Python does not read the
    # .pth files inside them, so the editable install's hook stays off there.
    (Path(purelib) / "_running_interpreter.pth").write_text("\n".join(borrowed) + "\n")

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
