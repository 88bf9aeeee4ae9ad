"""python -m sdjax.generate: shard layout, resume after SIGKILL, job splits, device counts,
input formats and refusals.

In-process runs share one pipeline per (model, dtype, devices) so the sampler compiles once
per device count for the whole file; shards are deterministic bytes, so datasets are compared
tar by tar.
"""

import csv
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import jax
import numpy as np
import pytest
from PIL import Image

from sdjax import generate
from sdjax.images import parse_parameters

PROMPTS = ["a red circle", "a blue square", "a green cat", "a photo", "a cat on a blue background"]
COMMON = ["--steps", "2", "--batch_size", "2", "--images_per_prompt", "2",
          "--samples_per_shard", "4"]


@pytest.fixture(scope="module", autouse=True)
def shared_pipelines():
    """One pipeline (and so one compile) per device count across the file's runs."""
    cache = {}
    load = generate.load_pipeline

    def cached(*args):
        if args not in cache:
            cache[args] = load(*args)
        return cache[args]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(generate, "load_pipeline", cached)
        yield


def _run(capsys, *argv):
    rc = generate.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _make(capsys, model, prompts, outdir, *extra, devices=1):
    rc, out, err = _run(capsys, "--model", model, "--prompts", prompts, "--outdir", outdir,
                        "--num_devices", devices, *COMMON, *extra)
    assert rc == 0, err
    return out


def _txt(path, prompts=PROMPTS):
    path.write_text("\n".join(prompts) + "\n")
    return path


def read_dataset(folder):
    """{key: {ext: bytes}} over every shard, failing on duplicates or a sample split across
    shards or interleaved with another (webdataset reads consecutive files as one sample)."""
    samples, finished = {}, set()
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as t:
            last = None
            for m in t.getmembers():
                key, ext = m.name.split(".", 1)
                if key != last:
                    assert key not in finished and key not in samples, f"{key} split/duplicated"
                    if last is not None:
                        finished.add(last)
                    last = key
                assert ext not in samples.setdefault(key, {}), f"{m.name} twice"
                samples[key][ext] = t.extractfile(m).read()
            finished.add(last)
    return samples


def _tars(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


def _check_complete(folder, prompts, k=2):
    samples = read_dataset(folder)
    assert sorted(samples) == [f"{i:09d}" for i in range(len(prompts) * k)]
    for key, files in samples.items():
        i = int(key)
        assert set(files) == {"png", "txt", "json"}
        assert files["txt"].decode() == prompts[i // k]
        meta = json.loads(files["json"])
        assert (meta["key"], meta["index"], meta["row"], meta["k"]) == (key, i, i // k, i % k)
    stats = json.loads((folder / "stats.json").read_text())
    assert stats["complete"] and stats["samples_complete"] == len(prompts) * k
    assert not [p for p in folder.iterdir() if p.name.endswith(".partial")]
    return samples


def test_layout_metadata_and_formats(sd1_folder, tmp_path, capsys):
    ref = tmp_path / "txt"
    out = _make(capsys, sd1_folder, _txt(tmp_path / "p.txt"), ref)
    assert "10 samples in 3 shard(s) of 4" in out and "images/s" in out
    samples = _check_complete(ref, PROMPTS)
    assert sorted(p.name for p in ref.iterdir()) == [
        "00000.tar", "00000_stats.json", "00001.tar", "00001_stats.json", "00002.tar",
        "00002_stats.json", "run.json", "stats.json"]
    assert json.loads((ref / "00002_stats.json").read_text())["count"] == 2
    meta = json.loads(samples["000000003"]["json"])
    assert meta | {"model": None} == {
        "key": "000000003", "index": 3, "row": 1, "k": 1, "prompt": "a blue square",
        "negative_prompt": "", "seed": 0, "seed_index": 3, "steps": 2, "scheduler": "pndm",
        "guidance_scale": 7.5, "width": 16, "height": 16, "model": None, "dtype": "float32"}
    image = Image.open(io.BytesIO(samples["000000003"]["png"]))
    assert image.size == (16, 16)
    params = parse_parameters(image.text["parameters"])
    assert params["prompt"] == "a blue square" and params["Seed index"] == "3"

    # The same rows as .jsonl (with 'caption') and .csv (quoted comma) give the same bytes.
    jl = tmp_path / "p.jsonl"
    jl.write_text("".join(json.dumps({"caption": p}) + "\n\n" for p in PROMPTS))
    _make(capsys, sd1_folder, jl, tmp_path / "jsonl")
    with open(tmp_path / "p.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "prompt", "seed"])
        w.writerows([i, p, ""] for i, p in enumerate(PROMPTS))
    _make(capsys, sd1_folder, tmp_path / "p.csv", tmp_path / "csv")
    assert _tars(tmp_path / "jsonl") == _tars(ref) == _tars(tmp_path / "csv")


def test_parquet(sd1_folder, tmp_path, capsys):
    pa = pytest.importorskip("pyarrow", reason="pyarrow not installed")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"prompt": PROMPTS}), tmp_path / "p.parquet")
    _make(capsys, sd1_folder, tmp_path / "p.parquet", tmp_path / "pq")
    _make(capsys, sd1_folder, _txt(tmp_path / "p.txt"), tmp_path / "txt")
    assert _tars(tmp_path / "pq") == _tars(tmp_path / "txt")


def test_parquet_without_pyarrow_is_a_clear_error(sd1_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "p.parquet").write_bytes(b"PAR1")
    rc, _, err = _run(capsys, "--model", sd1_folder, "--prompts", tmp_path / "p.parquet",
                      "--outdir", tmp_path / "out")
    assert rc == 2 and "needs pyarrow" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_per_row_seed_and_negative_prompt(sd1_folder, tmp_path, capsys):
    rows = [{"prompt": "a cat", "seed": 7}, {"prompt": "a cat"},
            {"prompt": "a cat", "seed": 7, "negative_prompt": "red"},
            {"prompt": "a cat", "seed": 7}]
    jl = tmp_path / "p.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _make(capsys, sd1_folder, jl, tmp_path / "out", "--negative_prompt", "blue")
    s = read_dataset(tmp_path / "out")
    meta = {k: json.loads(v["json"]) for k, v in s.items()}
    assert [(m["seed"], m["seed_index"], m["negative_prompt"]) for m in meta.values()] == [
        (7, 0, "blue"), (7, 1, "blue"), (0, 2, "blue"), (0, 3, "blue"),
        (7, 0, "red"), (7, 1, "red"), (7, 0, "blue"), (7, 1, "blue")]
    # A row's own seed pins its noise to (seed, k): the same row anywhere gives the same image,
    # while rows on the global seed, a different k or another negative prompt differ.
    assert s["000000000"]["png"] == s["000000006"]["png"]
    assert s["000000001"]["png"] == s["000000007"]["png"]
    assert len({s[f"{i:09d}"]["png"] for i in range(6)}) == 6


def test_lora_tags_split_a_batch_into_calls(sd1_folder, tmp_path, capsys):
    from PIL import Image

    from tests.test_adapters import write_kohya_lora

    (tmp_path / "loras").mkdir()
    write_kohya_lora(tmp_path / "loras" / "glow.safetensors")
    tagged = ["a cat <lora:glow:0.5>", "a cat"]
    one = ["--images_per_prompt", "1", "--lora_dir", tmp_path / "loras"]
    rc, _, err = _run(capsys, "--model", sd1_folder, "--prompts", _txt(tmp_path / "a.txt", tagged),
                      "--outdir", tmp_path / "a", "--num_devices", 1, *COMMON, *one)
    assert rc == 0, err
    # the tag says what it merges as --lora says its own (issue 28: generate said nothing)
    assert err.splitlines().count("LoRA glow x0.5") == 1
    _make(capsys, sd1_folder, _txt(tmp_path / "b.txt", ["a cat", "a cat"]), tmp_path / "b", *one)
    a, b = read_dataset(tmp_path / "a"), read_dataset(tmp_path / "b")

    def pixels(sample):
        return np.asarray(Image.open(io.BytesIO(sample["png"])))

    # One batch of two, two LoRA sets: each image got its own (and the same noise).
    assert a["000000000"]["txt"].decode() == tagged[0]
    # the PNG text names the LoRA's file as the WebUI does (the untagged image names none)
    from tests.test_adapters import _addnet_hash
    texts = [Image.open(io.BytesIO(a[k]["png"])).text["parameters"]
             for k in ("000000000", "000000001")]
    glow = _addnet_hash(tmp_path / "loras" / "glow.safetensors")[:12]
    assert f'Lora hashes: "glow: {glow}"' in texts[0] and "Lora hashes" not in texts[1]
    assert not np.array_equal(pixels(a["000000000"]), pixels(b["000000000"]))
    assert np.array_equal(pixels(a["000000001"]), pixels(b["000000001"]))


def test_a_tags_lora_line_is_said_once_per_lora_as_lora_says_it(tmp_path):
    from types import SimpleNamespace

    from sdjax.cli_args import apply_adapters
    from sdjax.lora_tags import TagLoras

    (tmp_path / "glow.safetensors").write_bytes(b"")
    (tmp_path / "ink.safetensors").write_bytes(b"")
    pipe = SimpleNamespace(loras={}, set_loras=lambda wanted: None,
                           load_lora=lambda path, scale: "glow")
    said = []
    tags = TagLoras(pipe, tmp_path, say=said.append)
    for batch in ({"glow": 0.5}, {}, {"glow": 0.5, "ink": 1.0}, {"glow": 0.5}, {"glow": 1.0}):
        tags.use(batch)
    assert said == ["LoRA glow x0.5", "LoRA ink x1", "LoRA glow x1"]
    given = SimpleNamespace(lora=[f"{tmp_path / 'glow.safetensors'}:0.5"], embedding=None)
    assert apply_adapters(given, pipe) == [said[0]]


def test_resume_after_sigkill_matches_an_uninterrupted_run(sd1_folder, tmp_path, capsys):
    prompts = [f"{PROMPTS[i % 5]} {i}" for i in range(60)]
    txt = _txt(tmp_path / "p.txt", prompts)
    out = tmp_path / "killed"
    argv = ["--model", str(sd1_folder), "--prompts", str(txt), "--outdir", str(out),
            "--num_devices", "1", *COMMON]
    # A real process, killed without warning as soon as its first shard is published. It
    # writes its sampler into the test run's compilation cache (tests/conftest.py), from
    # which the re-run below loads it instead of compiling it again.
    cache = jax.config.jax_compilation_cache_dir or "off"
    proc = subprocess.Popen([sys.executable, "-m", "sdjax.generate", *argv],
                            env={**os.environ, "SDJAX_COMPILATION_CACHE": cache},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("*.tar")):
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "no shard appeared"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    shards_before = len(list(out.glob("*.tar")))
    assert 0 < shards_before < 30, "the run finished before it was killed; nothing was tested"

    # The re-run starts from what is on disk (in this process, its sampler from the cache).
    rc, stdout, err = _run(capsys, *argv)
    assert rc == 0, err
    assert f"{shards_before} of this job's 30 already complete" in stdout
    _make(capsys, sd1_folder, txt, tmp_path / "whole")
    _check_complete(out, prompts)
    assert _tars(out) == _tars(tmp_path / "whole")


def test_two_jobs_make_exactly_the_single_jobs_shards(sd1_folder, tmp_path, capsys):
    txt = _txt(tmp_path / "p.txt", PROMPTS * 2)
    split = tmp_path / "split"
    out = _make(capsys, sd1_folder, txt, split, "--num_jobs", "2", "--job_index", "1")
    assert "job 1/2" in out
    assert sorted(p.name for p in split.glob("*.tar")) == ["00001.tar", "00003.tar"]
    assert not json.loads((split / "stats.json").read_text())["complete"]
    _make(capsys, sd1_folder, txt, split, "--num_jobs", "2", "--job_index", "0")
    _make(capsys, sd1_folder, txt, tmp_path / "single")
    assert _tars(split) == _tars(tmp_path / "single")
    stats = json.loads((split / "stats.json").read_text())
    assert stats["complete"] and [j["job_index"] for j in stats["jobs"]] == [0, 1]


def test_four_devices_write_the_same_bytes_as_one(sd1_folder, tmp_path, capsys):
    txt = _txt(tmp_path / "p.txt", PROMPTS * 2)
    out = _make(capsys, sd1_folder, txt, tmp_path / "four", devices=4)
    assert "4 x cpu, batch 8 (2/device)" in out
    _make(capsys, sd1_folder, txt, tmp_path / "one")
    assert _tars(tmp_path / "four") == _tars(tmp_path / "one")


def test_rerun_skips_refuses_changes_and_overwrites(sd1_folder, tmp_path, capsys):
    txt = _txt(tmp_path / "p.txt")
    out = tmp_path / "out"
    _make(capsys, sd1_folder, txt, out)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("*.tar")}
    assert "3 of this job's 3 already complete" in _make(capsys, sd1_folder, txt, out)
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("*.tar")} == before

    for extra, message in ((["--seed", "1"], "seed: 0 -> 1"),
                           (["--samples_per_shard", "5"], "samples_per_shard: 4 -> 5"),
                           (["--format", "jpg"], 'image_format: "png" -> "jpg"')):
        rc, _, err = _run(capsys, "--model", sd1_folder, "--prompts", txt, "--outdir", out,
                          "--num_devices", "1", *COMMON, *extra)
        assert rc == 2 and message in err and "--overwrite" in err, err
        assert err.startswith("error: ") and err.count("\n") == 1
    _txt(txt, PROMPTS[:4])
    rc, _, err = _run(capsys, "--model", sd1_folder, "--prompts", txt, "--outdir", out,
                      "--num_devices", "1", *COMMON)
    assert rc == 2 and "prompt_rows: 5 -> 4" in err and "prompts_sha256" in err
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("*.tar")} == before

    _make(capsys, sd1_folder, txt, out, "--seed", "1", "--overwrite")
    _check_complete(out, PROMPTS[:4])
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar"]
    assert _tars(out)["00000.tar"] != before["00000.tar"][0]
    assert json.loads((out / "run.json").read_text())["settings"]["seed"] == 1


def test_resume_remakes_truncated_and_corrupted_shards(sd1_folder, tmp_path, capsys):
    """A shard cut short or with a changed byte after it was written is not skipped on a
    re-run: it is named in one line and remade; --verify names each and exits 1 (issue 28:
    the re-run said complete with 4 samples missing)."""
    txt = _txt(tmp_path / "p.txt")
    out = tmp_path / "out"
    _make(capsys, sd1_folder, txt, out)
    good = _tars(out)
    assert "sha256" in json.loads((out / "00000_stats.json").read_text())
    assert _run(capsys, "--outdir", out, "--verify")[:2] == (0, "3 of 3 shard(s) read back\n")
    (out / "00000.tar").write_bytes(good["00000.tar"][:-2048])          # a full disk
    flipped = bytearray(good["00001.tar"])
    flipped[700] ^= 1                                                  # a bad copy
    (out / "00001.tar").write_bytes(bytes(flipped))
    rc, out_text, err = _run(capsys, "--outdir", out, "--verify")
    assert rc == 1 and "00002.tar" not in out_text, out_text
    assert "00000.tar: it is" in out_text and "its stats say" in out_text
    assert "00001.tar: its SHA-256 is not the one its stats record" in out_text
    assert "1 of 3 shard(s) read back; 2 do not" in out_text
    rc, out_text, err = _run(capsys, "--model", sd1_folder, "--prompts", txt, "--outdir", out,
                             "--num_devices", "1", *COMMON)
    assert rc == 0, err
    assert err.count("does not read back") == 2 and "00000.tar does not read back (it is" in err
    assert "1 of this job's 3 already complete, 8 samples to make" in out_text
    assert _tars(out) == good
    _check_complete(out, PROMPTS)
    assert _run(capsys, "--outdir", out, "--verify")[0] == 0
    # stats.json counts only shards that read back, whoever writes it
    (out / "00002.tar").write_bytes(b"")
    generate._write_run_stats(generate.Store(str(out)), generate.Layout(5, 2, 4), {}, 1, 0)
    stats = json.loads((out / "stats.json").read_text())
    assert not stats["complete"] and stats["samples_complete"] == 8
    rc, _, err = _run(capsys, "--outdir", tmp_path / "none", "--verify")
    assert rc == 2 and "manifest" in err and err.count("\n") == 1


def test_jpg_webp_and_remote_outdir(sd1_folder, tmp_path, capsys):
    fsspec = pytest.importorskip("fsspec")
    txt = _txt(tmp_path / "p.txt", PROMPTS[:2])
    _make(capsys, sd1_folder, txt, tmp_path / "jpg", "--format", "jpg", "--quality", "80")
    s = read_dataset(tmp_path / "jpg")
    assert Image.open(io.BytesIO(s["000000000"]["jpg"])).format == "JPEG"
    url = "memory://sdjax-test/webp"
    _make(capsys, sd1_folder, txt, url, "--format", "webp")
    fs = fsspec.filesystem("memory")
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("/sdjax-test/webp", detail=False))
    assert names == ["00000.tar", "00000_stats.json", "run.json", "stats.json"]
    local = tmp_path / "fetched"
    local.mkdir()
    fs.get_file("/sdjax-test/webp/00000.tar", str(local / "00000.tar"))
    webp = read_dataset(local)["000000003"]["webp"]
    img = Image.open(io.BytesIO(webp))
    assert img.format == "WEBP" and img.size == (16, 16)
    # The re-run sees the remote shards as complete.
    assert "1 of this job's 1 already complete" in _make(capsys, sd1_folder, txt, url,
                                                          "--format", "webp")


def test_reads_back_with_webdataset(sd1_folder, tmp_path, capsys):
    wds = pytest.importorskip("webdataset", reason="webdataset not installed")
    _make(capsys, sd1_folder, _txt(tmp_path / "p.txt"), tmp_path / "out")
    ds = wds.WebDataset(sorted(str(p) for p in (tmp_path / "out").glob("*.tar")),
                        shardshuffle=False).decode("rgb8").to_tuple("png", "txt", "json")
    items = list(ds)
    assert len(items) == 10
    assert [t for _, t, _ in items] == [p for p in PROMPTS for _ in range(2)]
    assert all(np.asarray(img).shape == (16, 16, 3) for img, _, _ in items)


@pytest.mark.parametrize("case, content, extra, message", [
    ("malformed jsonl", '{"prompt": "a"}\n{"prompt": "b"\n', [], "p.jsonl line 2: not valid JSON"),
    ("jsonl without prompt", '{"text": "a"}\n', [], "line 1: no 'prompt' or 'caption' field"),
    ("jsonl bad seed", '{"prompt": "a", "seed": -1}\n', [], "seed must be an integer"),
    ("empty txt", "\n  \n", [], "no prompts in the file"),
    ("csv without column", "id,text\n1,a\n", [], "no 'prompt' or 'caption' column"),
    ("csv short row", "prompt,seed\na,1\nb\n", [], "line 3: expected 2 fields"),
    ("unsupported type", "a", [], "unsupported prompt file type '.md'"),
    ("missing file", None, [], "No such file"),
    ("quality with png", "a\n", ["--quality", "90"], "--quality applies to"),
    ("job index", "a\n", ["--num_jobs", "2", "--job_index", "2"], "--job_index must be in"),
    ("shard size", "a\n", ["--samples_per_shard", "0"], "--samples_per_shard must be at least"),
    ("steps", "a\n", ["--steps", "0"], "--steps must be at least 1"),
])
def test_errors_are_one_line_and_write_nothing(case, content, extra, message, sd1_folder,
                                               tmp_path, capsys):
    suffix = {"malformed jsonl": "jsonl", "jsonl without prompt": "jsonl",
              "jsonl bad seed": "jsonl", "csv without column": "csv", "csv short row": "csv",
              "unsupported type": "md"}.get(case, "txt")
    prompts = tmp_path / f"p.{suffix}"
    if content is not None:
        prompts.write_text(content)
    rc, _, err = _run(capsys, "--model", sd1_folder, "--prompts", prompts, "--outdir",
                      tmp_path / "out", "--num_devices", "1", *extra)
    assert rc == 2
    assert message in err, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_remote_outdir_without_fsspec_is_a_clear_error(sd1_folder, tmp_path, capsys,
                                                        monkeypatch):
    monkeypatch.setitem(sys.modules, "fsspec", None)
    rc, _, err = _run(capsys, "--model", sd1_folder, "--prompts", _txt(tmp_path / "p.txt"),
                      "--outdir", "gs://bucket/data")
    assert rc == 2 and "remote paths need fsspec" in err and err.count("\n") == 1


def test_shards_without_manifest_are_not_touched(sd1_folder, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "00000.tar").write_bytes(b"not ours")
    rc, _, err = _run(capsys, "--model", sd1_folder, "--prompts", _txt(tmp_path / "p.txt"),
                      "--outdir", out, "--num_devices", "1", *COMMON)
    assert rc == 2 and "no run.json" in err
    assert (out / "00000.tar").read_bytes() == b"not ours" and len(list(out.iterdir())) == 1


def test_an_upscaler_model_is_refused_before_it_loads(upscaler_folder, tmp_path, capsys):
    """sdjax.dispatch knows the x4 upscaler: generate (prompts to images) refuses it in one
    line, naming the command that upscales, and writes nothing."""
    outdir = tmp_path / "data"
    rc, _, err = _run(capsys, "--model", upscaler_folder, "--prompts", _txt(tmp_path / "p.txt"),
                      "--outdir", outdir)
    assert rc == 2 and "x4 upscaler" in err and "--image" in err
    assert len(err.strip().splitlines()) == 1 and not outdir.exists()


def test_control_image_column(sd1_folder, sd1_controlnets, tmp_path, capsys, monkeypatch):
    """--controlnet with the table's control_image column: each row's image (relative to the
    table, through the preprocessor) is its samples' control image in the call, and the
    shards, the PNG text and the manifest record it. The call itself is not run here (the
    ControlNet call is tests/test_controlnet.py's): the pipeline's submit is recorded."""
    from sdjax.dataset.manifest import MANIFEST
    from sdjax.outputs import PipelineOutput
    rng = np.random.default_rng(0)
    (tmp_path / "maps").mkdir()
    maps = {"maps/a.png": rng.integers(0, 256, (16, 16, 3), np.uint8),
            "b.png": rng.integers(0, 256, (16, 16, 3), np.uint8)}
    for name, pixels in maps.items():
        Image.fromarray(pixels).save(tmp_path / name)
    jl = tmp_path / "p.jsonl"
    jl.write_text("".join(json.dumps({"prompt": p, "control_image": c}) + "\n"
                          for p, c in [("a cat", "maps/a.png"), ("a dog", "b.png")]))
    pipe = generate.load_pipeline(str(sd1_folder), "float32", 1, False,
                                  generate.ModelOptions())
    seen, attached = [], []

    class Done:
        def __init__(self, n, h, w):
            self.shape = (n, h, w, 3)

        def result(self):
            return PipelineOutput(images=np.zeros(self.shape, np.uint8), seeds=[0])

    def submit(texts, **kw):
        seen.append(kw)
        return Done(len(texts), kw["height"], kw["width"])

    monkeypatch.setattr(pipe, "submit", submit, raising=False)
    monkeypatch.setattr(pipe, "load_controlnet", attached.append, raising=False)
    net = f"{sd1_controlnets[0]}:0.5"
    flags = ["--controlnet", net, "--control_preprocessor", "invert", "--control_end",
             "0.8", "--images_per_prompt", "1", "--height", "16", "--width", "16"]
    _make(capsys, str(sd1_folder), jl, tmp_path / "out", *flags)
    assert attached == [str(sd1_controlnets[0])] and len(seen) == 1
    call = seen[0]
    assert (call["controlnet_conditioning_scale"], call["control_guidance_end"],
            call["control_mode"]) == ([0.5], [0.8], ["balanced"])
    for got, name in zip(call["control_image"], maps, strict=True):
        np.testing.assert_array_equal(got, 255 - maps[name])
    samples = read_dataset(tmp_path / "out")
    assert [json.loads(s["json"])["control_image"] for s in samples.values()] == list(maps)
    text = Image.open(io.BytesIO(samples["000000000"]["png"])).info["parameters"]
    assert parse_parameters(text)["ControlNet 0"] == (
        "Module: invert, Model: cn0, Weight: 0.5, Resize Mode: Just Resize, Guidance Start: "
        "0.0, Guidance End: 0.8, Pixel Perfect: False, Control Mode: Balanced")
    settings = json.loads((tmp_path / "out" / MANIFEST).read_text())["settings"]
    assert settings["controlnet"][0]["preprocessor"] == "invert"
    # A row's missing file, and a row without an image and no --control_image: exit 2.
    for rows, message in [([{"prompt": "x", "control_image": "nope.png"}],
                           "nope.png: file not found"),
                          ([{"prompt": "x"}], "row 1 of")]:
        jl.write_text("".join(json.dumps(r) + "\n" for r in rows))
        rc, _, err = _run(capsys, "--model", sd1_folder, "--prompts", jl, "--outdir",
                          tmp_path / "bad", "--num_devices", 1, *COMMON, *flags)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert rc == 2 and len(errors) == 1 and message in errors[0], err
        assert not list((tmp_path / "bad").glob("*.tar"))
