"""python -m sdjax.serve through a real HTTP client: the WebUI API on the toy model, merged
calls on 8 fake devices, bad input, auth, the queue bound, interrupt, shutdown, the web page.

One server per module (uvicorn on a free localhost port in a thread, sharing the pipeline so
one shape compiles once); every generation uses SHAPE.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from sdjax.dispatch import pipeline_class
from sdjax.images import parse_parameters
from sdjax.pipeline import StableDiffusionPipeline
from sdjax.serve.app import create_app
from sdjax.serve.background import BackgroundServer
from sdjax.serve.checkpoints import ModelRegistry
from sdjax.serve.limits import Limits

SHAPE = {"width": 16, "height": 16, "steps": 2, "sampler_name": "Euler a"}


@pytest.fixture(scope="module")
def pipe():
    return StableDiffusionPipeline.from_pretrained("toy", dtype="float32")


@pytest.fixture(scope="module")
def calls(pipe):
    """Counts the pipeline's compiled calls (each ``pipe(...)`` is one ``submit``)."""
    counter = {"n": 0}
    submit = pipe.submit

    def counting(*a, **k):
        counter["n"] += 1
        return submit(*a, **k)

    pipe.submit = counting
    yield counter
    del pipe.submit


# The test server's batch (one device): every call runs this many images, padded, so the
# pipeline calls that give a request's expected pixels bit for bit run at this batch too (at
# another batch they may differ by float rounding, docs/tpu-gpu.md#reproducibility).
MAX_BATCH = 8


@pytest.fixture(scope="module")
def registry(pipe, sd1_folder):
    loaded = {"toy": pipe}

    def load(source):
        # the pipeline class by the folder, as python -m sdjax.serve loads (the x4 upscaler)
        return loaded.get(source) or pipeline_class(source).from_pretrained(
            source, dtype="float32", num_devices=1)

    return ModelRegistry({"toy": "toy", "tiny": str(sd1_folder)}, load)


@pytest.fixture(scope="module")
def server(registry, calls):
    app = create_app(registry, window_s=0.05, max_batch=MAX_BATCH)
    s = BackgroundServer(app)
    s.batcher = app.state.batcher
    s.client = httpx.Client(base_url=s.url, timeout=120)
    yield s
    s.client.close()
    s.stop()


def _decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def _txt2img(client, **fields):
    r = client.post("/sdapi/v1/txt2img", json={**SHAPE, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def test_txt2img_matches_sdjax_sample(server, pipe, tmp_path, monkeypatch):
    from sdjax import sample
    body = _txt2img(server.client, prompt="a red circle", negative_prompt="green", seed=5,
                    batch_size=2, cfg_scale=6)
    assert set(body) == {"images", "parameters", "info"}
    info = json.loads(body["info"])
    assert info["seed"] == 5 and info["all_seeds"] == [5, 6]
    assert info["all_prompts"] == ["a red circle"] * 2 and info["sampler_name"] == "Euler a"
    assert (info["width"], info["height"], info["steps"], info["cfg_scale"]) == (16, 16, 2, 6)
    assert body["parameters"]["seed"] == 5 and body["parameters"]["batch_size"] == 2
    # sdjax.sample with --seed s at the server's batch (the same compiled call:
    # from_pretrained hands it our pipe)
    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained",
                        classmethod(lambda cls, *a, **k: pipe))
    for k, seed in enumerate((5, 6)):
        out = tmp_path / str(seed)
        assert sample.main(["--model", "toy", "--prompt", "a red circle", "--negative_prompt",
                            "green", "--seed", str(seed), "--steps", "2", "--width", "16",
                            "--height", "16", "--scheduler", "Euler a", "--guidance_scale",
                            "6", "--rng", "nv", "--batch_size", str(MAX_BATCH),
                            "--outdir", str(out)]) == 0
        written = Image.open(next(out.glob("*.png")))
        served = _decode(body["images"][k])
        np.testing.assert_array_equal(np.asarray(served), np.asarray(written))
        ours = parse_parameters(served.text["parameters"])
        theirs = parse_parameters(written.text["parameters"])
        assert theirs.pop("Seed index") == "0"
        assert theirs.pop("RNG") == "NV"  # the server's default, the WebUI's GPU: none
        assert ours == theirs and ours["Seed"] == str(seed)
        assert served.text["parameters"] == info["infotexts"][k]
    # PNG Info reads it back with the WebUI's field names
    r = server.client.post("/sdapi/v1/png-info", json={"image": body["images"][1]})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["info"] == info["infotexts"][1]
    p = got["parameters"]
    assert (p["Prompt"], p["Negative prompt"], p["Seed"], p["Sampler"]) == (
        "a red circle", "green", "6", "Euler a")
    assert (p["Size-1"], p["Size-2"], p["CFG scale"], p["Steps"]) == ("16", "16", "6", "2")


def test_random_seed_is_reported(server):
    info = json.loads(_txt2img(server.client, prompt="a cat", seed=-1)["info"])
    assert 0 <= info["seed"] < 2**32 and info["all_seeds"] == [info["seed"]]
    assert f"Seed: {info['seed']}," in info["infotexts"][0]


def test_eight_concurrent_requests_share_one_call(server, pipe, calls):
    reqs = [{"prompt": p, "negative_prompt": n, "seed": 100 + i, "cfg_scale": 2.0 + i}
            for i, (p, n) in enumerate([("a red circle", ""), ("a blue square", "red"),
                                        ("a green cat", ""), ("a photo", "blue"),
                                        ("red on blue", ""), ("a square", "circle"),
                                        ("green background", ""), ("a cat photo", "")])]
    server.batcher.window_s = 60  # the call starts when the 8th image arrives, not on a timer
    calls_before, batches_before = calls["n"], server.batcher.calls
    try:
        with ThreadPoolExecutor(8) as ex:
            bodies = list(ex.map(lambda r: _txt2img(server.client, **r), reqs))
    finally:
        server.batcher.window_s = 0.05
    assert calls["n"] - calls_before == 1 and server.batcher.calls - batches_before == 1
    alone = [pipe(r["prompt"], negative_prompt=r["negative_prompt"], num_inference_steps=2,
                  guidance_scale=r["cfg_scale"], height=16, width=16, scheduler="Euler a",
                  seed=r["seed"], rng="nv").images[0] for r in reqs]
    for r, body, expected in zip(reqs, bodies, alone, strict=True):
        info = json.loads(body["info"])
        assert info["all_seeds"] == [r["seed"]] and info["all_prompts"] == [r["prompt"]]
        assert f"CFG scale: {r['cfg_scale']:g}," in info["infotexts"][0]
        np.testing.assert_array_equal(np.asarray(_decode(body["images"][0])), expected)
    # and one of them sent alone through the server gives the same image again
    again = _txt2img(server.client, **reqs[3])
    assert again["images"] == bodies[3]["images"]


def test_mixed_prompt_lengths_each_get_what_they_would_alone(server, pipe):
    """Prompts of 1 chunk and of 5 chunks with a negative of 7 (no common multiple within the
    limit) sent together (each valid alone) both succeed, each with its image alone; a prompt
    past the limit sent with them is refused alone, with a 4xx, and fails none of them (issue
    28: all four got a 500)."""
    from sdjax import prompts

    def words(n_chunks):  # a prompt of exactly n chunks of the toy's tokenizer
        text = " ".join(["red"] * (prompts.chunk_tokens(pipe.tokenizer) * (n_chunks - 1) + 1))
        assert prompts.prompt_chunks([text], pipe.tokenizer) == [n_chunks]
        return text

    reqs = [{"prompt": "a red circle", "seed": 1},
            {"prompt": words(5), "negative_prompt": words(7), "seed": 3},
            {"prompt": "red " * 100_000, "seed": 4}]
    server.batcher.window_s = 1.0
    calls = server.batcher.calls
    try:
        with ThreadPoolExecutor(3) as ex:
            answers = list(ex.map(lambda r: server.client.post(
                "/sdapi/v1/txt2img", json={**SHAPE, "cfg_scale": 7, **r}), reqs))
    finally:
        server.batcher.window_s = 0.05
    assert answers[2].status_code == 422 and "past the limit of 24 chunks" in answers[2].text
    # contexts of 1 and 7 chunks: two calls, so merging changed neither request's context
    assert server.batcher.calls - calls == 2
    for r, answer in zip(reqs[:2], answers, strict=False):
        assert answer.status_code == 200, answer.text
        alone = pipe(r["prompt"], negative_prompt=r.get("negative_prompt", ""), seed=r["seed"],
                     num_inference_steps=2, height=16, width=16, scheduler="Euler a",
                     guidance_scale=7.0, rng="nv").images[0]
        np.testing.assert_array_equal(np.asarray(_decode(answer.json()["images"][0])), alone)


def test_one_compiled_batch_per_shape_and_only_alike_requests_merge(registry):
    """Every call of a shape runs at one batch (padded to max_batch), so a request's pixels
    never depend on how many others share its call: XLA picks kernels by shape, and on one
    CPU device the toy's image moved by 1.7e-5 between 1 and 2 images per device (issue 28).
    At one batch, rows never mix: test_eight_concurrent_requests_share_one_call (a full
    call) and test_mixed_prompt_lengths_each_get_what_they_would_alone (two calls of one
    image padded to 8 rows) are bitwise the requests alone. What a call compiles in from its
    prompts (the context length) and guidance (whether the unconditional pass runs) is part
    of the shape: requests that differ there never merge."""
    from types import SimpleNamespace

    from sdjax.lora_tags import TagLoras
    from sdjax.serve.generation import plan_txt2img, run_call
    from sdjax.serve.schemas import Txt2ImgRequest

    def plan(**fields):
        return plan_txt2img(Txt2ImgRequest(**{**SHAPE, **fields}), registry, Limits())

    alone = plan(prompt="a red circle", seed=1, cfg_scale=7)
    others = [plan(prompt="a blue square", negative_prompt="red", seed=2, cfg_scale=3,
                   batch_size=3),
              plan(prompt="(a green:1.3) cat", seed=9, cfg_scale=12, batch_size=12)]
    assert all(p.shape == alone.shape for p in others)

    class Stub:  # what run_call needs of a pipeline, recording each call's batch
        num_devices, loras, calls = 8, {}, []

        def set_loras(self, wanted):
            pass

        def __call__(self, prompts, **kw):
            self.calls.append((len(prompts), kw["batch_size_per_device"]))
            return SimpleNamespace(images=np.zeros((len(prompts), 1, 1, 3), np.uint8))

    stub = Stub()
    fake = SimpleNamespace(get=lambda title: stub, lora_dir=None,
                           tag_loras=lambda title: TagLoras(stub, None))
    for max_batch, per_device in ((16, 2), (12, 2), (8, 1), (None, None)):
        stub.calls.clear()
        run = run_call(fake, max_batch=max_batch)
        for specs in (alone.specs, others[0].specs + alone.specs,
                      (others[1].specs + alone.specs + others[0].specs)[:max_batch or 16]):
            run(alone.shape, specs)
        assert stub.calls == [(1, per_device), (4, per_device), (max_batch or 16, per_device)]
    # Unguided and guided requests, and prompts of other context lengths, run apart.
    assert plan(prompt="a red circle", cfg_scale=1).shape != alone.shape
    long = "red " * 20  # 2 chunks of the toy's 14 tokens: a context of 6
    assert plan(prompt=long).shape.prompt_layout != alone.shape.prompt_layout
    assert plan(prompt=long).shape == plan(prompt="a cat", negative_prompt=long).shape


def test_a_request_that_gives_no_size_or_sampling_takes_the_models(registry):
    """The model's sdjax.json and training size, as the CLIs take them (issue 28: the toy
    made a 512x512 image of noise in 30 s); /progress rises during a shape's first call."""
    from sdjax.serve.batcher import Batcher
    from sdjax.serve.generation import plan_txt2img
    from sdjax.serve.schemas import Txt2ImgRequest

    plan = plan_txt2img(Txt2ImgRequest(prompt="a cat"), registry, Limits())
    s = plan.shape.settings
    assert (s.size.height, s.size.width, s.sampling.steps, s.sampling.scheduler) == (
        32, 32, 15, "dpmpp_2m")
    assert (plan.request.width, plan.request.steps, plan.request.cfg_scale) == (32, 15, 7.5)
    assert plan.request.sampler_name == "DPM++ 2M"

    def slow(shape, specs):
        time.sleep(0.6)
        return np.zeros((len(specs), 1, 1, 3), np.uint8)

    b = Batcher(slow, window_s=0)
    try:
        b.submit(plan.shape, plan.specs)
        seen = []
        for _ in range(5):
            time.sleep(0.1)
            seen.append(b.progress()["fraction"])
        assert seen[-1] > seen[0] > 0 and seen[-1] < 1
    finally:
        b.stop()


def test_get_endpoints(server):
    c = server.client
    samplers = c.get("/sdapi/v1/samplers").json()
    names = [s["name"] for s in samplers]
    for name in ("Euler a", "Euler", "DPM++ 2M", "DPM++ 2M Karras", "DDIM", "PLMS", "LMS",
                 "Heun"):
        assert name in names
    assert all(set(s) == {"name", "aliases", "options"} for s in samplers)
    models = c.get("/sdapi/v1/sd-models").json()
    assert [m["title"] for m in models] == ["toy", "tiny"]
    assert [m["filename"] for m in models] == ["toy", "model"]  # names, not server paths
    assert {"title", "model_name", "hash", "sha256", "filename", "config"} <= set(models[0])
    assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "toy"
    prog = c.get("/sdapi/v1/progress").json()
    assert {"progress", "eta_relative", "state", "current_image", "textinfo"} <= set(prog)
    assert c.get("/health").json()["status"] == "ok"
    assert "<html" in c.get("/").text.lower()
    # the page's own: the model's defaults (its sdjax.json, its UNet's size), the server's
    assert c.get("/sdjax/v1/model-defaults", params={"model": "toy"}).json() == {
        "model": "toy", "width": 32, "height": 32, "steps": 15, "cfg_scale": 7.5,
        "sampler_name": "DPM++ 2M", "upscaler": False, "sdxl": False}
    r = c.get("/sdjax/v1/model-defaults", params={"model": "nope"})
    assert r.status_code == 404 and "'nope' not found" in r.json()["detail"]
    features = c.get("/sdjax/v1/features").json()
    assert features == {"refiner": None, "refiner_switch_at": 0.8, "loras": False,
                        "controlnet": False,
                        **{k: features[k] for k in ("hires", "tiling", "variations")}}
    # a feature is reported as served exactly when its request is not refused
    for feature, field in (("hires", {"enable_hr": True}), ("tiling", {"tiling": True}),
                           ("variations", {"subseed_strength": 0.5})):
        r = c.post("/sdapi/v1/txt2img", json={**SHAPE, **field, "steps": 0})
        refused = "is not supported" in r.json()["detail"]
        assert r.status_code == 422 and features[feature] is not refused, (feature, r.text)
    assert c.get("/sdapi/v1/loras").json() == []
    assert c.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}


def test_options_switch_model(server, registry):
    c = server.client
    r = c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny"})
    assert r.status_code == 200, r.text
    try:
        assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "tiny"
        r = c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope"})
        assert r.status_code == 404 and "'nope' not found" in r.json()["detail"]
        # typed as override_settings are, nothing changed when one is wrong
        for body, said in (({"sd_model_checkpoint": 5}, "sd_model_checkpoint: must be a "
                            "model title (a string), got 5"),
                           ({"sd_model_checkpoint": "toy", "CLIP_stop_at_last_layers": "x"},
                            "CLIP_stop_at_last_layers: must be an integer, got 'x'")):
            r = c.post("/sdapi/v1/options", json=body)
            assert r.status_code == 422 and r.json()["detail"] == said
        assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "tiny"
        # the WebUI's sampler options: listed with its defaults, set, checked
        assert {k: v for k, v in c.get("/sdapi/v1/options").json().items()
                if k.startswith("uni_pc") or k == "eta_ddim"} == {
            "eta_ddim": 0.0, "uni_pc_variant": "bh1", "uni_pc_skip_type": "time_uniform",
            "uni_pc_order": 3, "uni_pc_lower_order_final": True}
        assert c.post("/sdapi/v1/options", json={"uni_pc_order": 2}).status_code == 200
        assert c.get("/sdapi/v1/options").json()["uni_pc_order"] == 2
        r = c.post("/sdapi/v1/options", json={"uni_pc_variant": "bh3", "uni_pc_order": 4})
        assert r.status_code == 422 and r.json()["detail"].startswith(
            "uni_pc_variant must be one of bh1, bh2, vary_coeff")
        assert c.get("/sdapi/v1/options").json()["uni_pc_order"] == 2
    finally:
        c.post("/sdapi/v1/options", json={"uni_pc_order": 3})
        registry.select("toy")


@pytest.mark.parametrize("body, status, message", [
    ("{not json", 400, "not valid JSON"),
    ("[1, 2]", 422, "body: Input should be a valid dictionary"),
    ({"width": 18}, 422, "width must be a positive multiple of 4, got 18"),  # the toy's VAE
    ({"height": 0}, 422, "height must be a positive integer, got 0"),
    ({"steps": -3}, 422, "steps must be between 1 and 150, got -3"),
    ({"steps": "many"}, 422, "steps: Input should be a valid integer"),
    ({"sampler_name": "Euler b"}, 422, "unknown sampler 'Euler b'"),
    ({"sampler_name": "Euler", "scheduler": "Karas"}, 422, "unknown schedule_type 'Karas'"),
    ({"sampler_name": "DDPM", "scheduler": "Karras"}, 422, "has no Karras schedule"),
    ({"sampler_name": "DPM adaptive"}, 422, "sampler 'DPM adaptive' is not supported: an "),
    ({"width": 2048, "height": 2048}, 422, "limit of 1048576 pixels"),
    ({"batch_size": 65}, 422, "limit of 64 images per request"),
    ({"n_iter": 0}, 422, "batch_size and n_iter must be at least 1"),
    ({"cfg_scale": -1}, 422, "cfg_scale must not be negative"),
    ({"seed": 2**40}, 422, "seed must be in [0, 2**32) or -1"),
    ({"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, 422, "unknown hr_upscaler"),
    ({"override_settings": {"sd_model_checkpoint": "sd-xl"}}, 404, "'sd-xl' not found"),
    ({"prompt": "a <lora:style:0.5> cat"}, 422, "<lora:style> needs a LoRA folder"),
    ({"prompt": "a <lora:style:lots> cat"}, 422, "the multiplier must be a finite number"),
    ({"override_settings": {"CLIP_stop_at_last_layers": 0}}, 422,
     "CLIP_stop_at_last_layers must be at least 1"),
    # issue 28: each was a 500, or ran wrongly
    ({"prompt": "red " * 400}, 422, "prompt is too long: 29 chunks of 75 tokens"),
    ({"negative_prompt": "(blue) " * 400}, 422, "negative_prompt is too long"),
    ({"override_settings": {"sd_model_checkpoint": 3}}, 422,
     "override_settings.sd_model_checkpoint: must be a model title (a string), got 3"),
    ({"override_settings": {"sd_model_checkpoint": ["toy"]}}, 422, "got ['toy']"),
    ({"prompt": "a \ud800 cat"}, 422, "prompt: contains a lone UTF-16 surrogate"),
    ({"eta": "NaN"}, 422, "eta: must be a finite number, got 'NaN'"),
    ({"cfg_scale": "inf"}, 422, "cfg_scale: must be a finite number"),
    ({"steps": True}, 422, "steps: a number, not true"),
    ({"override_settings": {"CLIP_stop_at_last_layers": True}}, 422,
     "CLIP_stop_at_last_layers: must be an integer, got True"),
    # fields this task does not use are checked by range all the same
    ({"denoising_strength": 7}, 422, "denoising_strength must be in [0, 1], got 7"),
    ({"hr_scale": -1}, 422, "hr_scale must be >= 0, got -1"),
    ({"hr_second_pass_steps": -1}, 422, "hr_second_pass_steps must be >= 0, got -1"),
    ({"refiner_switch_at": 5}, 422, "refiner_switch_at must be in [0, 1], got 5"),
    ({"eta": -1}, 422, "eta must be >= 0, got -1"),
    ({"seed_resize_from_w": -5}, 422, "seed_resize_from_w must be >= -1, got -5"),
    ({"subseed_strength": 2}, 422, "subseed_strength must be in [0, 1], got 2"),
    ({"scheduler": "nope"}, 422, "unknown schedule_type 'nope'"),
    # the hires pass's own prompt meets the limits before the first pass runs
    ({"enable_hr": True, "hr_prompt": " AND ".join(["a cat"] * 9)}, 422,
     "hr_prompt: prompt has 9 AND parts; the limit is 8"),
])
def test_bad_requests_get_a_one_line_4xx(server, body, status, message):
    c = server.client
    if isinstance(body, str):
        r = c.post("/sdapi/v1/txt2img", content=body)
    elif "\ud800" in body.get("prompt", ""):  # JSON's escape (httpx would not encode it)
        r = c.post("/sdapi/v1/txt2img", content=json.dumps({**SHAPE, **body}))
    else:
        r = c.post("/sdapi/v1/txt2img", json={**SHAPE, **body})
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert message in detail and "\n" not in detail


def test_other_bad_input(server):
    c = server.client
    r = c.post("/sdapi/v1/txt2img", content=b"{" + b" " * (40 << 20) + b"}")
    assert r.status_code == 413 and "limit of" in r.json()["detail"]
    r = c.post("/sdapi/v1/png-info", json={"image": "not base64!"})
    assert r.status_code == 422 and "not a base64-encoded image" in r.json()["detail"]
    r = c.post("/sdapi/v1/img2img", json={"prompt": "a cat"})
    assert r.status_code == 422 and "init_images" in r.json()["detail"]
    assert c.get("/sdapi/v1/txt2img").status_code == 405
    # the server still serves after all of that
    assert c.get("/health").json()["status"] == "ok"


def test_head_and_options_answer_on_every_route(server):
    """HEAD: the GET's status and headers, no body (uptime checkers send it); OPTIONS: 204
    with the path's methods in Allow; unknown paths and POST-only routes as a server does."""
    c = server.client
    schema = c.get("/openapi.json").json()  # the routes the app declares
    gets = [path for path, ops in schema["paths"].items() if "get" in ops and "{" not in path]
    gets += ["/"]  # the page (left out of the schema)
    assert {"/", "/health", "/sdapi/v1/samplers", "/sdapi/v1/progress"} <= set(gets)
    for path in gets:
        params = {"model": "toy"} if path == "/sdjax/v1/model-defaults" else None
        got, head = c.get(path, params=params), c.head(path, params=params)
        assert head.status_code == got.status_code == 200, path
        assert head.content == b"" and got.content, path
        assert int(head.headers["content-length"]) == len(got.content), path
        assert head.headers["content-type"] == got.headers["content-type"], path
        r = c.options(path)
        assert r.status_code == 204 and r.content == b"", path
        assert {"GET", "HEAD", "OPTIONS"} <= set(r.headers["allow"].split(", ")), path
    r = c.options("/sdapi/v1/txt2img")
    assert r.status_code == 204 and r.headers["allow"] == "OPTIONS, POST"
    # a browser's CORS preflight: the same answer; no CORS options, so no Access-Control-*
    r = c.options("/sdapi/v1/txt2img", headers={"Origin": "http://elsewhere.example",
                                                "Access-Control-Request-Method": "POST"})
    assert r.status_code == 204 and not any(k.startswith("access-control") for k in r.headers)
    r = c.head("/sdapi/v1/txt2img")
    assert r.status_code == 405 and r.content == b""
    assert c.head("/nope").status_code == 404 and c.options("/nope").status_code == 404
    assert c.get("/health").json()["status"] == "ok"


def test_lora_tags_and_clip_skip_decide_the_call(registry, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from sdjax.lora_tags import TagLoras
    from sdjax.serve.batcher import ImageSpec
    from sdjax.serve.generation import plan_txt2img, run_call
    from sdjax.serve.limits import BadRequest
    from sdjax.serve.schemas import Txt2ImgRequest

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "glow.safetensors").write_bytes(b"")  # found by name, loaded below
    monkeypatch.setattr(registry, "lora_dir", tmp_path)

    def shape(prompt, **fields):
        req = Txt2ImgRequest(**{**SHAPE, "prompt": prompt, **fields})
        return plan_txt2img(req, registry, Limits()).shape

    tagged = shape("a <lora:glow:0.5> cat")
    assert tagged.loras == (("glow", 0.5),) and tagged == shape("a dog<lora:glow:0.5>")
    assert tagged != shape("a <lora:glow:0.6> cat") and tagged != shape("a cat")
    assert shape("a cat", override_settings={"CLIP_stop_at_last_layers": 2}
                 ).settings.sampling.clip_skip == 2
    with pytest.raises(BadRequest, match="no nope.safetensors in") as e:
        shape("a <lora:nope> cat")
    assert e.value.status == 422

    class Stub:  # what run_call needs of a pipeline, recording the LoRAs of each call
        def __init__(self):
            self.loras, self.calls = {}, []

        def set_loras(self, wanted):
            self.loras = dict(wanted)

        def __call__(self, prompts, **kw):
            self.calls.append((prompts, dict(self.loras), kw["clip_skip"]))
            return SimpleNamespace(images=np.zeros((len(prompts), 1, 1, 3), np.uint8))

    stub = Stub()
    tag_loras = TagLoras(stub, tmp_path)
    run = run_call(SimpleNamespace(get=lambda title: stub, lora_dir=tmp_path,
                                   tag_loras=lambda title: tag_loras))
    spec = ImageSpec("a <lora:glow:0.5> cat", "", 0, 7.0)
    run(tagged, [spec])
    run(shape("a cat"), [dataclasses.replace(spec, prompt="a cat")])
    glow = str((tmp_path / "sub" / "glow.safetensors").resolve())
    assert stub.calls == [(["a  cat"], {glow: 0.5}, 1), (["a cat"], {}, 1)]


def test_png_text_names_the_loras_as_the_webui_and_png_info_reads_it(server, registry,
                                                                     tmp_path, monkeypatch):
    from sdjax.weights.safetensors_io import save_safetensors
    from tests.test_adapters import _addnet_hash
    rng = np.random.RandomState(0)
    key = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"  # the toy's width is 64
    lora = tmp_path / "ink.safetensors"
    save_safetensors({f"{key}.lora_down.weight": rng.randn(2, 64).astype(np.float32),
                      f"{key}.lora_up.weight": rng.randn(64, 2).astype(np.float32)}, lora)
    monkeypatch.setattr(registry, "lora_dir", tmp_path)
    out = _txt2img(server.client, prompt="a cat <lora:ink:0.5>", seed=4)
    text = _decode(out["images"][0]).text["parameters"]
    assert text.startswith("a cat <lora:ink:0.5>\n")
    assert f'Lora hashes: "ink: {_addnet_hash(lora)[:12]}"' in text
    assert json.loads(out["info"])["infotexts"] == [text]
    r = server.client.post("/sdapi/v1/png-info", json={"image": out["images"][0]})
    assert r.json()["parameters"]["Lora hashes"] == f"ink: {_addnet_hash(lora)[:12]}"
    assert r.json()["parameters"]["Prompt"] == "a cat <lora:ink:0.5>"


def _b64(image: np.ndarray, fmt: str = "PNG", prefix: bool = False) -> str:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, fmt)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f"data:image/{fmt.lower()};base64,{data}" if prefix else data


def _pictures(n: int, size: int = 16) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def _square_mask(size: int = 16) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4:size // 2, size // 4:size // 2] = 255
    return mask


IMG2IMG = {**SHAPE, "prompt": "a green circle", "cfg_scale": 5, "seed": 7}


def test_img2img_matches_the_pipeline(server, pipe):
    a, b = _pictures(2)
    jpeg = _b64(b, "JPEG")
    body = server.client.post("/sdapi/v1/img2img", json={
        **IMG2IMG, "batch_size": 2, "denoising_strength": 0.6,
        "init_images": [_b64(a, prefix=True), jpeg]})
    assert body.status_code == 200, body.text
    body = body.json()
    b_decoded = np.asarray(_decode(jpeg).convert("RGB"))  # what the server sees of the JPEG
    for k, (seed, init) in enumerate([(7, a), (8, b_decoded)]):
        expected = pipe("a green circle", num_inference_steps=2, guidance_scale=5, height=16,
                        width=16, scheduler="Euler a", seed=seed, image=init,
                        strength=0.6, rng="nv").images[0]
        np.testing.assert_array_equal(np.asarray(_decode(body["images"][k])), expected)
    info = json.loads(body["info"])
    assert info["denoising_strength"] == 0.6 and info["all_seeds"] == [7, 8]
    assert "Denoising strength: 0.6" in info["infotexts"][0]
    assert parse_parameters(info["infotexts"][1])["Seed"] == "8"
    assert body["parameters"]["init_images"] is None  # include_init_images is off


def test_inpainting_only_masked_matches_the_pipeline(server, pipe):
    (picture,) = _pictures(1, 32)
    keep = 255 - _square_mask(32)  # inverted below: the square is repainted
    r = server.client.post("/sdapi/v1/img2img", json={
        **IMG2IMG, "denoising_strength": 0.9, "init_images": [_b64(picture)],
        "mask": _b64(keep, prefix=True), "inpainting_mask_invert": 1, "inpainting_fill": 1,
        "mask_blur": 2, "inpaint_full_res": True, "inpaint_full_res_padding": 4})
    assert r.status_code == 200, r.text
    expected = pipe("a green circle", num_inference_steps=2, guidance_scale=5, height=16,
                    width=16, scheduler="Euler a", seed=7, image=picture,
                    mask_image=_square_mask(32), strength=0.9, mask_blur=2,
                    padding_mask_crop=4, rng="nv").images[0]
    served = np.asarray(_decode(r.json()["images"][0]))
    assert served.shape == (32, 32, 3)  # pasted back into the full image
    np.testing.assert_array_equal(served, expected)
    text = json.loads(r.json()["info"])["infotexts"][0]
    for pair in ("Denoising strength: 0.9", "Mask blur: 2", "Mask mode: Inpaint not masked",
                 "Inpaint area: Only masked", "Masked area padding: 4"):
        assert pair in text


def test_inpainting_fill_matches_the_pipeline(server, pipe):
    """inpainting_fill 0 (the WebUI's default, "fill"), in the only-masked call's shape."""
    (picture,) = _pictures(1, 32)
    r = server.client.post("/sdapi/v1/img2img", json={
        **IMG2IMG, "denoising_strength": 0.9, "init_images": [_b64(picture)],
        "mask": _b64(_square_mask(32)), "mask_blur": 2, "inpaint_full_res": True,
        "inpaint_full_res_padding": 4})
    assert r.status_code == 200, r.text
    args = dict(num_inference_steps=2, guidance_scale=5, height=16, width=16,
                scheduler="Euler a", seed=7, image=picture, mask_image=_square_mask(32),
                strength=0.9, mask_blur=2, padding_mask_crop=4, rng="nv")
    expected = pipe("a green circle", masked_content="fill", **args).images[0]
    original = pipe("a green circle", **args).images[0]
    served = np.asarray(_decode(r.json()["images"][0]))
    np.testing.assert_array_equal(served, expected)
    assert np.abs(served.astype(int) - original).max() > 0  # the fill changed the start
    assert "Masked content: fill" in json.loads(r.json()["info"])["infotexts"][0]


@pytest.mark.parametrize("fill, content", [(0, "fill"), (1, "original"), (2, "latent noise"),
                                           (3, "latent nothing")])
def test_inpainting_fill_reaches_the_call(registry, fill, content):
    from sdjax.serve.generation import plan_img2img
    from sdjax.serve.schemas import Img2ImgRequest
    req = Img2ImgRequest(**{**IMG2IMG, "init_images": [_b64(_pictures(1)[0])],
                            "mask": _b64(_square_mask()), "inpainting_fill": fill})
    assert plan_img2img(req, registry, Limits()).shape.settings.task.masked_content == content


def test_img2img_merges_only_requests_of_one_strength(registry):
    from sdjax.serve.generation import plan_img2img
    from sdjax.serve.schemas import Img2ImgRequest

    def shape(**fields):
        req = Img2ImgRequest(**{**IMG2IMG, "init_images": [_b64(_pictures(1)[0])], **fields})
        return plan_img2img(req, registry, Limits()).shape

    assert shape(denoising_strength=0.5) == shape(denoising_strength=0.5, seed=3)
    assert shape(denoising_strength=0.5) != shape(denoising_strength=0.6)
    masked = {"mask": _b64(_square_mask()), "inpainting_fill": 1, "mask_blur": 0}
    assert shape(**masked) != shape()  # inpainting and img2img never share a call


def _too_large_png() -> str:
    return _b64(np.zeros((1024, 1032, 3), np.uint8))


@pytest.mark.parametrize("fields, message", [
    ({"init_images": ["not base64!"]}, "init_images[0]: not a base64-encoded image"),
    ({"init_images": [base64.b64encode(b"just text").decode()]},
     "init_images[0]: not a base64-encoded image"),
    ({"init_images": "big"}, "init_images[0]: 1032x1024 is more than this server's limit"),
    ({"mask": _b64(_square_mask(24)), "inpainting_fill": 1},
     "mask: 24x24 is not the size of init_images[0] (16x16)"),
    ({"mask": "AAAA", "inpainting_fill": 1}, "mask: not a base64-encoded image"),
    ({"mask": _b64(_square_mask()), "inpainting_fill": 4}, "inpainting_fill must be one of 0 "
     "(fill), 1 (original), 2 (latent noise), 3 (latent nothing); got 4"),
    ({"mask": _b64(_square_mask()), "inpainting_fill": -1}, "got -1"),
    ({"mask": _b64(np.zeros((16, 16), np.uint8)), "inpainting_fill": 1},
     "the mask is empty"),
    ({"resize_mode": 1}, "resize_mode=1 is not supported"),
    ({"denoising_strength": 0}, "denoising_strength must be in (0, 1], got 0"),
    ({"batch_size": 2, "init_images": "three"}, "init_images: 3 images for 2 image(s)"),
    ({"mask_blur_x": 2, "mask_blur_y": 6, "mask": _b64(_square_mask()), "inpainting_fill": 1},
     "give mask_blur"),
    ({"mask_blur": -1, "mask": _b64(_square_mask()), "inpainting_fill": 1},
     "mask_blur must be >= 0, got -1"),
    # without a mask the inpainting fields are unused, and checked all the same
    ({"inpainting_fill": 9}, "inpainting_fill must be one of 0 (fill)"),
    ({"mask_blur": -1}, "mask_blur must be >= 0, got -1"),
    ({"inpaint_full_res_padding": -3}, "inpaint_full_res_padding must be >= 0, got -3"),
    ({"inpainting_mask_invert": 2}, "inpainting_mask_invert must be in [0, 1], got 2"),
])
def test_bad_img2img_requests_get_a_one_line_4xx(server, fields, message):
    fields = {"init_images": [_b64(_pictures(1)[0])], **fields}
    if fields["init_images"] == "big":
        fields["init_images"] = [_too_large_png()]
    elif fields["init_images"] == "three":
        fields["init_images"] = [_b64(p) for p in _pictures(3)]
    r = server.client.post("/sdapi/v1/img2img", json={**IMG2IMG, **fields})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert message in detail and "\n" not in detail


def test_queue_full_and_interrupt(server):
    c, b = server.client, server.batcher
    b.window_s, b.max_queue = 60, 1
    try:
        with ThreadPoolExecutor(1) as ex:
            waiting = ex.submit(c.post, "/sdapi/v1/txt2img", json={**SHAPE, "batch_size": 2})
            deadline = time.monotonic() + 30
            while c.get("/health").json()["queued"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            r = c.post("/sdapi/v1/txt2img", json=SHAPE)
            assert r.status_code == 503 and r.headers["Retry-After"].isdigit()
            assert "already waiting" in r.json()["detail"]
            assert c.post("/sdapi/v1/interrupt").status_code == 200
            done = waiting.result(30)
        assert done.status_code == 200 and done.json()["images"] == []
    finally:
        b.window_s, b.max_queue = 0.05, 64
    assert c.get("/health").json()["queued"] == 0


def test_queue_position_of_each_request(server, registry):
    """The WebUI's task progress (POST /internal/progress by force_task_id): a request waits
    behind the call on the devices and the requests queued before it, runs, completes."""
    import threading

    from sdjax.serve.batcher import Batcher
    from sdjax.serve.generation import plan_txt2img
    from sdjax.serve.schemas import Txt2ImgRequest
    plan = plan_txt2img(Txt2ImgRequest(prompt="a cat", **SHAPE), registry, Limits())
    go = threading.Event()

    def held(shape, specs):
        go.wait(30)
        return np.zeros((len(specs), 1, 1, 3), np.uint8)

    b = Batcher(held, window_s=0)
    try:
        first = b.submit(plan.shape, plan.specs, task_id="task(a)")
        deadline = time.monotonic() + 30
        while not b.task("task(a)")["active"]:  # on the "devices"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        b.submit(plan.shape, plan.specs, task_id="task(b)")
        b.submit(plan.shape, plan.specs, task_id="task(c)")
        assert b.task("task(a)") == {"active": True, "queued": False, "completed": False,
                                     "ahead": 0, "row": 0}
        assert [(b.task(t)["queued"], b.task(t)["ahead"]) for t in ("task(b)", "task(c)")] == [
            (True, 1), (True, 2)]
        assert b.task("task(zzz)") == {"active": False, "queued": False, "completed": False,
                                       "ahead": None}
        go.set()
        first.future.result(30)
        b.stop(30)
        assert all(b.task(t)["completed"] for t in ("task(a)", "task(b)", "task(c)"))
    finally:
        go.set()
        b.stop()
    # Over HTTP: requests held in the queue (a long merge window) and their positions.
    c, sb = server.client, server.batcher
    sb.window_s = 60
    try:
        with ThreadPoolExecutor(2) as ex:
            waiting = [ex.submit(c.post, "/sdapi/v1/txt2img",
                                 json={**SHAPE, "seed": k, "force_task_id": f"task(h{k})"})
                       for k in range(2)]
            deadline = time.monotonic() + 30
            while c.get("/health").json()["queued"] < 2:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            seen = [c.post("/internal/progress", json={"id_task": f"task(h{k})"}).json()
                    for k in range(2)]
            assert c.post("/sdapi/v1/interrupt").status_code == 200
            assert [w.result(30).status_code for w in waiting] == [200, 200]
    finally:
        sb.window_s = 0.05
    assert sorted((p["queued"], p["active"], p["queue_position"], p["textinfo"])
                  for p in seen) == [(True, False, 0, "Queued: 0 ahead"),
                                     (True, False, 1, "Queued: 1 ahead")]
    done = c.post("/internal/progress", json={"id_task": "task(h0)"}).json()
    assert (done["completed"], done["queued"], done["active"]) == (True, False, False)
    unknown = c.post("/internal/progress", json={"id_task": "task(nope)"}).json()
    assert (unknown["completed"], unknown["textinfo"]) == (False, "Waiting...")


def _callbacks(compiled) -> int:
    """Host callbacks in a compiled call's program (jax.debug.callback's custom calls)."""
    return len(re.findall(r'custom_call_target="[^"]*callback', compiled.as_text()))


def test_live_previews_change_nothing_else(server, pipe, monkeypatch):
    """The WebUI's "Approx cheap" preview: a call without on_step has no host callback and
    makes the same image as one with it; the server reports each step's previews while
    live_previews_enable is on."""
    from sdjax.serve.samplers import sampler_settings
    c, b = server.client, server.batcher
    body = {**SHAPE, "prompt": "a cat", "seed": 3, "cfg_scale": 7}
    plain = _txt2img(c, **body)["images"][0]
    seen = []
    report = b.report
    monkeypatch.setattr(b, "report", lambda *a: seen.append(a) or report(*a))
    assert c.post("/sdapi/v1/options", json={"live_previews_enable": True}).status_code == 200
    try:
        assert c.get("/sdapi/v1/options").json()["live_previews_enable"] is True
        shown = _txt2img(c, **body)["images"][0]
    finally:
        c.post("/sdapi/v1/options", json={"live_previews_enable": False})
    np.testing.assert_array_equal(np.asarray(_decode(shown)), np.asarray(_decode(plain)))
    # one report per evaluation of the 2 steps, each with the call's image at latent size
    assert [(step, total) for step, total, _ in seen] == [(1, 2), (2, 2)]
    h, w, _ = pipe.latent_shape(16, 16)
    assert all(im.shape == (1, h, w, 3) and im.dtype == np.uint8 for *_, im in seen)
    assert not np.array_equal(seen[0][2], seen[1][2])  # each its own step's estimate
    scheduler, schedule_type = sampler_settings("Euler a")
    call = dict(prompt=["a cat"], seeds=[3], image_indices=[0], height=16, width=16,
                num_inference_steps=2, scheduler=scheduler, guidance_scale=[7.0], rng="nv",
                **({} if schedule_type is None else {"schedule_type": schedule_type}))
    # the server's two programs (compiled above; fetched here, not compiled again)
    compiled = pipe.compile_seconds
    assert _callbacks(pipe.compile(**call)) == 0
    assert _callbacks(pipe.compile(**call, on_step=print)) > 0
    assert pipe.compile_seconds == compiled
    with pytest.raises(TypeError, match="on_step must be a function"):
        pipe.compile(**call, on_step=3)
    r = c.post("/sdapi/v1/options", json={"live_previews_enable": "yes"})
    assert r.status_code == 422 and "live_previews_enable" in r.json()["detail"]


def test_preview_is_the_cheap_map_of_the_denoised_estimate():
    """sdjax.previews: the clean latents recovered from a variance-preserving model input for
    each prediction type, then the WebUI's coefficients."""
    from sdjax import previews
    rng = np.random.default_rng(0)
    x0, noise = rng.normal(size=(2, 3, 3, 4)), rng.normal(size=(2, 3, 3, 4))
    sigma = 1.7
    a = 1 / (1 + sigma ** 2)
    xin = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
    v = np.sqrt(a) * noise - np.sqrt(1 - a) * x0  # diffusers' v target
    for kind, out in (("epsilon", noise), ("v_prediction", v), ("sample", x0)):
        np.testing.assert_allclose(previews.denoised(xin, out, sigma, kind), x0, atol=1e-5)
    inputs = {}
    previews.call_inputs(print, 2, (3, 3, 4), False, inputs)
    assert inputs["preview_map"].shape == (2, 4, 3) and len(set(inputs["preview_token"])) == 1
    np.testing.assert_array_equal(inputs["preview_map"][1], np.float32(previews.SD_COEFFICIENTS))
    got = []
    token = int(inputs["preview_token"][0])
    # two devices of one row each; the first device's report calls on_step
    previews.SINKS._calls[token] = (lambda *a: got.append(a), np.zeros((2, 3, 3, 3), np.uint8))
    previews.SINKS.deliver(2, 5, np.array([token]), np.full((1, 3, 3, 3), 9, np.uint8), 1)
    assert got == []
    previews.SINKS.deliver(2, 5, np.array([token]), np.full((1, 3, 3, 3), 4, np.uint8), 0)
    (step, total, images), = got
    assert (step, total) == (2, 5) and images[0].max() == 4 and images[1].min() == 9
    with pytest.raises(ValueError, match="4 latent channels"):
        previews.call_inputs(print, 1, (3, 3, 16), False, {})


def test_progress_routes_serve_the_running_calls_preview(server, registry):
    """While a call runs, its reported step and its rows' previews: each request's own first
    image in /internal/progress (once per new preview), the call's first in /progress."""
    import threading
    c, b = server.client, server.batcher
    go, running = threading.Event(), threading.Event()
    frames = np.zeros((3, 2, 2, 3), np.uint8)
    frames[1] = 200  # the second request's image

    def held(shape, specs):
        b.report(2, 4, frames)
        running.set()
        go.wait(30)
        return np.zeros((len(specs), 16, 16, 3), np.uint8)

    run, b._run = b._run, held
    c.post("/sdapi/v1/options", json={"live_previews_enable": True})
    try:
        with ThreadPoolExecutor(2) as ex:
            waiting = [ex.submit(c.post, "/sdapi/v1/txt2img", json={
                **SHAPE, "batch_size": k + 1, "force_task_id": f"task(p{k})"}) for k in range(2)]
            assert running.wait(30)
            deadline = time.monotonic() + 30
            while len(b.progress()["jobs"]) < 2:  # both in the one call (a 50 ms window)
                assert time.monotonic() < deadline
                time.sleep(0.02)
            rows = [b.task(f"task(p{k})")["row"] for k in range(2)]
            p = c.post("/internal/progress", json={"id_task": "task(p1)"}).json()
            again = c.post("/internal/progress", json={
                "id_task": "task(p1)", "id_live_preview": p["id_live_preview"]}).json()
            old = c.get("/sdapi/v1/progress").json()
            go.set()
            assert [w.result(30).status_code for w in waiting] == [200, 200]
    finally:
        go.set()
        b._run = run
        c.post("/sdapi/v1/options", json={"live_previews_enable": False})
    assert (p["active"], p["sampling_step"], p["sampling_steps"], p["progress"]) == (
        True, 1, 2, 0.5)
    assert p["live_preview"].startswith("data:image/png;base64,")
    # each request's first row in the merged call: 1 and 2 images, in either order
    assert rows in ([0, 1], [2, 0])
    image = np.asarray(_decode(p["live_preview"].split(",", 1)[1]))
    np.testing.assert_array_equal(image, frames[rows[1]])
    assert again["live_preview"] is None  # the client has it already
    np.testing.assert_array_equal(np.asarray(_decode(old["current_image"])), frames[0])
    assert old["state"]["sampling_step"] == 1


def test_a_client_that_leaves_costs_nothing_and_stops_nobody(server):
    c, b = server.client, server.batcher
    images_before = b.images
    b.window_s = 60
    try:
        with pytest.raises(httpx.ReadTimeout):
            c.post("/sdapi/v1/txt2img", json={**SHAPE, "batch_size": 3}, timeout=0.3)
        deadline = time.monotonic() + 30
        while c.get("/health").json()["queued"]:  # its job is dropped, not run
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        b.window_s = 0.05
    assert len(_txt2img(c, prompt="a cat")["images"]) == 1
    assert b.images - images_before == 1


def test_auth_and_graceful_shutdown(registry):
    app = create_app(registry, window_s=1.0, credentials={"ann": "s3cret"},
                     limits=Limits(max_queue=4))
    s = BackgroundServer(app)
    try:
        with httpx.Client(base_url=s.url, timeout=120) as c:
            for path in ("/sdapi/v1/options", "/"):
                r = c.get(path)
                assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Basic")
            assert c.get("/sdapi/v1/options", auth=("ann", "wrong")).status_code == 401
            assert c.get("/sdapi/v1/options", auth=("bob", "s3cret")).status_code == 401
            assert c.get("/sdapi/v1/options", auth=("ann", "s3crét")).status_code == 401
            r = c.get("/sdapi/v1/options", headers={"Authorization": "Basic ???"})
            assert r.status_code == 401
            assert c.get("/health").status_code == 200
            assert c.get("/sdapi/v1/options", auth=("ann", "s3cret")).status_code == 200
            # stop while a request waits in its batching window: it is still answered
            with ThreadPoolExecutor(1) as ex:
                pending = ex.submit(c.post, "/sdapi/v1/txt2img", auth=("ann", "s3cret"),
                                    json={**SHAPE, "prompt": "a cat"})
                while c.get("/health").json()["queued"] < 1:
                    time.sleep(0.02)
                s.server.should_exit = True
                r = pending.result(60)
            assert r.status_code == 200 and len(r.json()["images"]) == 1
    finally:
        s.stop()
    assert not s.thread.is_alive()


def test_models_dir_lists_diffusers_folders(tmp_path, sd1_folder):
    from sdjax.serve.checkpoints import discover
    (tmp_path / "models").mkdir()
    for name in ("b-model", "a-model"):
        (tmp_path / "models" / name).symlink_to(sd1_folder, target_is_directory=True)
    (tmp_path / "models" / "notes").mkdir()  # not a model: no model_index.json
    titles = discover(["toy"], tmp_path / "models")
    assert list(titles) == ["toy", "a-model", "b-model"]
    reg = ModelRegistry(titles, load=lambda source: source)
    assert reg.find("a-model [abc123]") == "a-model" and reg.find(None) == "toy"
    assert reg.find("c-model") is None
    with pytest.raises(ValueError, match="both called 'a-model'"):
        discover([str(tmp_path / "models" / "a-model")], tmp_path / "models")
    with pytest.raises(ValueError, match="is not a folder"):
        discover([], tmp_path / "nowhere")


def test_command_line_errors(tmp_path, capsys):
    from sdjax.serve.__main__ import main
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for argv, message in ((["--model", str(tmp_path / "no")], "error: model not found"),
                              (["--port", port], f"cannot listen on 127.0.0.1:{port}"),
                              (["--api_auth", "nopassword"], "--api_auth takes user:password"),
                              (["--max_queue", "0"], "--max_queue must be at least 1"),
                              (["--refiner", str(tmp_path / "no")],
                               "--refiner: model not found"),
                              (["--warmup", "64"], "expected WxH")):
            assert main(argv) == 2, argv
            err = capsys.readouterr().err.strip().splitlines()
            assert err[-1].startswith("error: ") and message in err[-1], err
            assert not any("Traceback" in line for line in err)


def test_real_process_serves_and_stops_gracefully(sd1_folder):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "sdjax.serve", "--model", str(sd1_folder),
                             "--port", str(port), "--num_devices", "1"],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
        assert health["model"] == "model" and health["calls"] == 0  # nothing compiled yet
        proc.send_signal(signal.SIGTERM)
        # uvicorn re-raises the signal after its graceful shutdown (older versions exit 0)
        assert proc.wait(60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    assert "Traceback" not in err and "req 1 GET /health 200" in err
    assert "stopped after 0 call(s)" in err


# ------------------------------------------------------------------ the web page, in a browser
CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium installed (.ci/run installs it: apt-get install chromium)")
PHONE, DESKTOP = {"width": 390, "height": 844}, {"width": 1024, "height": 768}
# SDJAX_PAGE_SCREENSHOTS=docs/images writes the docs' screenshots (small palette PNGs)
SCREENSHOTS = os.environ.get("SDJAX_PAGE_SCREENSHOTS")
# The page's generations: the toy's own defaults (its sdjax.json: 32x32, 15 steps of DPM++
# 2M) when writing the docs' screenshots, else the small shape the API tests compile too.
PAGE_SHAPE = ({"width": 32, "height": 32, "steps": 15, "sampler_name": "DPM++ 2M"}
              if SCREENSHOTS else SHAPE)
S = PAGE_SHAPE["width"]
WEBUI_INFOTEXT = ("a blue cat, sitting\nNegative prompt: red, blurry\nSteps: 3, Sampler: "
                  "DPM++ 2M, Schedule type: Karras, CFG scale: 4.5, Seed: 1234, Size: 24x16, "
                  "Model hash: abc, Model: sd15, Denoising strength: 0.55, Hires upscale: 1.5, "
                  "Hires steps: 4, Hires upscaler: Latent (bicubic), Tiling: True, "
                  "Version: v1.10.1")


@pytest.fixture(scope="module")
def page(server):
    """One browser page for the module's browser tests (in file order), at a phone's width."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        # root in CI containers: chromium's sandbox needs user namespaces it may not have
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport=PHONE)
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('status').textContent"
                                   ".startsWith('toy:')")
            yield page
        finally:
            browser.close()


def _screenshots(page, name: str, tmp_path) -> None:
    """The page at a desktop's and a phone's width, as docs/serve.md shows it."""
    out = Path(SCREENSHOTS) if SCREENSHOTS else tmp_path
    for size, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
        page.set_viewport_size(viewport)
        path = out / f"serve-{name}-{size}.png"
        page.screenshot(path=str(path), full_page=True)
        if SCREENSHOTS:
            Image.open(path).convert("RGB").quantize(48, dither=Image.Dither.NONE).save(
                path, optimize=True)
        assert path.stat().st_size > 0
    page.set_viewport_size(PHONE)


def _run(page, path: str, images: int) -> dict:
    """Press Generate; the request the page sent (as JSON) once its images are shown."""
    before = page.locator("#gallery img").count()
    with page.expect_request(lambda r: r.url.endswith(path) and r.method == "POST") as req:
        page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#gallery img').length === "
                           f"{before + images}", timeout=120_000)
    page.wait_for_function("[...document.querySelectorAll('#gallery img')]"
                           ".every(i => i.complete && i.naturalWidth > 0)")
    return req.value.post_data_json


def _circle(size: int) -> np.ndarray:
    """A red disc on blue: an input image the screenshots show well."""
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2 + 0.5) ** 2 + (xx - size / 2 + 0.5) ** 2 < (size / 3) ** 2
    return np.where(disc[..., None], [220, 40, 40], [40, 70, 200]).astype(np.uint8)


def _shape(page, tab: str) -> None:
    """The mode's tab, and the size, steps and sampler of PAGE_SHAPE in the form."""
    page.click(f"#tab-{tab}")
    for field in ("width", "height", "steps"):
        page.fill(f"#{field}", str(PAGE_SHAPE[field]))
    page.select_option("#sampler_name", PAGE_SHAPE["sampler_name"])


@needs_chromium
def test_web_page_opens_with_the_models_defaults(page, server, registry, pipe, tmp_path):
    assert page.input_value("#model") == "toy"
    # the toy's sdjax.json: 15 steps of DPM++ 2M; its size: its UNet's sample size (32x32)
    assert pipe.default_hw == (32, 32)
    toy = {"#width": "32", "#height": "32", "#steps": "15", "#cfg_scale": "7.5",
           "#sampler_name": "DPM++ 2M"}
    assert {k: page.input_value(k) for k in toy} == toy
    # what this server does not serve is not shown
    for box in ("#controlnet_box", "#refiner_box", "#networks", "#tab-upscale"):
        assert page.is_hidden(box), box
    features = server.client.get("/sdjax/v1/features").json()
    for box, feature in (("#hires_box", "hires"), ("#tiling_box", "tiling"),
                         ("#variation_box", "variations")):
        assert page.is_visible(box) is features[feature], box
    # another model: its own defaults (no sdjax.json: 50 steps, its scheduler config's PNDM)
    page.select_option("#model", "tiny")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('tiny:')",
                           timeout=60_000)
    tiny = registry.get("tiny")
    assert page.input_value("#steps") == "50" and page.input_value("#sampler_name") == "PLMS"
    assert page.input_value("#width") == str(tiny.default_hw[1])
    page.select_option("#model", "toy")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('toy:')")
    assert page.input_value("#steps") == "15"
    # the LoRAs a <lora:name:w> tag finds are listed; a click puts the tag in the prompt
    (tmp_path / "styles").mkdir()
    for name in ("ink.safetensors", "styles/watercolor.safetensors", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    registry.lora_dir = tmp_path
    try:
        assert [x["name"] for x in server.client.get("/sdapi/v1/loras").json()] == [
            "ink", "watercolor"]
        page.evaluate("loadNetworks()")
        page.click("#networks summary")
        page.click("#loras button:has-text('watercolor')")
        assert page.input_value("#prompt") == (
            "a red circle on a blue background <lora:watercolor:1>")
    finally:
        registry.lora_dir = None
        page.fill("#prompt", "a red circle on a blue background")
        page.evaluate("loadNetworks()")
    # every control has a label a screen reader reads
    unlabelled = page.evaluate("""[...document.querySelectorAll('input, select, textarea')]
        .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label'))
        .map(e => e.id)""")
    assert unlabelled == []


@needs_chromium
def test_web_page_txt2img(page, tmp_path):
    _shape(page, "txt2img")
    page.fill("#seed", "7")
    page.fill("#batch_size", "2")
    body = _run(page, "/sdapi/v1/txt2img", 2)
    assert (body["width"], body["steps"], body["sampler_name"]) == (
        S, PAGE_SHAPE["steps"], PAGE_SHAPE["sampler_name"])
    sizes = page.eval_on_selector_all("#gallery img", "imgs => imgs.slice(0, 2).map(i => "
                                      "[i.naturalWidth, i.naturalHeight])")
    assert sizes == [[S, S], [S, S]]
    params = page.inner_text("#parameters")
    assert "Seed: 7," in params and "Seed: 8," in params
    assert re.fullmatch(r"sdjax-\d{4}-7\.png", page.get_attribute("#gallery a", "download"))
    assert "2 image(s)" in page.inner_text("#status")
    _screenshots(page, "txt2img", tmp_path)
    # a result goes to img2img with a click
    page.click("#gallery figure >> nth=1 >> button:has-text('img2img')")
    page.wait_for_function(  # once the image has loaded
        "document.getElementById('tab-img2img').getAttribute('aria-selected') === 'true'")
    assert page.evaluate("document.getElementById('init_image').naturalWidth") == S
    assert page.get_attribute("#init_image", "src") == page.get_attribute(
        "#gallery a >> nth=1", "href")


@needs_chromium
def test_web_page_img2img_from_an_upload(page, tmp_path):
    picture = _circle(32)
    Image.fromarray(picture).save(tmp_path / "input.png")
    _shape(page, "img2img")
    page.set_input_files("#init_file", str(tmp_path / "input.png"))
    page.wait_for_function("document.getElementById('mask_canvas').width === 32")  # loaded
    page.fill("#batch_size", "1")
    page.fill("#denoising_strength", "0.6")
    body = _run(page, "/sdapi/v1/img2img", 1)
    np.testing.assert_array_equal(np.asarray(_decode(body["init_images"][0])), picture)
    assert (body["denoising_strength"], body["resize_mode"], body["width"]) == (0.6, 0, S)
    assert "mask" not in body
    assert "Denoising strength: 0.6" in page.inner_text("#parameters")
    _screenshots(page, "img2img", tmp_path)


@needs_chromium
def test_web_page_inpaints_a_painted_mask(page, tmp_path):
    Image.fromarray(_circle(S)).save(tmp_path / "input.png")
    _shape(page, "inpaint")
    page.fill("#batch_size", "1")
    page.set_input_files("#init_file", str(tmp_path / "input.png"))
    page.wait_for_function(f"document.getElementById('mask_canvas').width === {S}")
    # a stroke across the middle
    page.fill("#brush_size", "100")
    page.select_option("#inpainting_fill", "1")
    page.locator("#mask_canvas").scroll_into_view_if_needed()
    box = page.locator("#mask_canvas").bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * 0.2, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.8, y, steps=6)
    page.mouse.up()
    body = _run(page, "/sdapi/v1/img2img", 1)
    _screenshots(page, "inpaint", tmp_path)  # the painted mask and its result
    mask = np.asarray(_decode(body["mask"]).convert("L"))
    assert mask.shape == (S, S) and len(body["init_images"]) == 1
    assert (mask[S // 2 - 1:S // 2 + 1, S * 5 // 16:S * 11 // 16] == 255).all()  # painted: white
    assert (mask[:3] == 0).all() and (mask[-3:] == 0).all()  # untouched: black
    assert (body["inpainting_fill"], body["inpaint_full_res"], body["mask_blur"]) == (1, False, 4)
    assert "Mask blur: 4" in page.inner_text("#parameters")
    # erase, clear and invert change what is sent
    page.click("#mask_invert")
    inverted = np.asarray(_decode(page.evaluate("maskPNG()")).convert("L"))
    np.testing.assert_array_equal(inverted, 255 - mask)
    page.click("#mask_clear")
    assert page.evaluate("maskPNG()") is None


@needs_chromium
def test_web_page_reads_a_dropped_png(page, tmp_path):
    from sdjax.images import encode_png
    png = base64.b64encode(encode_png(_pictures(1)[0], WEBUI_INFOTEXT)).decode()
    page.evaluate("for (const k of ['hr_prompt', 'hr_negative_prompt']) "
                  "document.getElementById(k).value = 'from before'")
    data = page.evaluate_handle("""(b64) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], 'webui.png', {type: 'image/png'}));
        return dt; }""", png)
    page.dispatch_event("#gallery", "drop", {"dataTransfer": data})  # anywhere on the page
    page.wait_for_function("!document.getElementById('png_to_txt2img').disabled")
    assert page.inner_text("#png_text") == WEBUI_INFOTEXT
    _screenshots(page, "pnginfo", tmp_path)
    page.click("#png_to_txt2img")
    assert page.get_attribute("#tab-txt2img", "aria-selected") == "true"
    filled = {k: page.input_value(k) for k in ("#prompt", "#negative_prompt", "#steps",
                                               "#sampler_name", "#cfg_scale", "#seed",
                                               "#width", "#height")}
    assert filled == {"#prompt": "a blue cat, sitting", "#negative_prompt": "red, blurry",
                      "#steps": "3", "#sampler_name": "DPM++ 2M Karras", "#cfg_scale": "4.5",
                      "#seed": "1234", "#width": "24", "#height": "16"}
    assert page.is_checked("#enable_hr") and page.is_checked("#tiling")
    hires = {k: page.input_value(k) for k in ("#hr_scale", "#hr_second_pass_steps",
                                              "#hr_upscaler", "#hr_denoising_strength")}
    assert hires == {"#hr_scale": "1.5", "#hr_second_pass_steps": "4",
                     "#hr_upscaler": "Latent (bicubic)", "#hr_denoising_strength": "0.55"}
    # no Hires sampler / prompt / negative prompt in the text: the first pass's (empty)
    assert [page.input_value(k) for k in ("#hr_sampler_name", "#hr_prompt",
                                          "#hr_negative_prompt")] == ["", "", ""]
    page.uncheck("#enable_hr")
    page.uncheck("#tiling")


@needs_chromium
def test_web_page_sends_a_pngs_variation_and_hires_fields_to_txt2img(page, server, tmp_path):
    """PNG info's "Send to txt2img" with the WebUI's variation-seed and hires fields: the form
    takes them, and Generate sends them (answered here without generating)."""
    from sdjax.images import encode_png
    text = ("a green square\nNegative prompt: blur\nSteps: 4, Sampler: Euler a, CFG scale: 5, "
            "Seed: 42, Variation seed: 77, Variation seed strength: 0.25, Seed resize from: "
            "40x24, Size: 32x32, Model: toy, Denoising strength: 0.4, Hires upscale: 2, "
            "Hires steps: 3, Hires upscaler: Latent (nearest), Hires sampler: DPM++ 2M, "
            "Hires schedule type: Karras, Hires prompt: \"a green square, sharp\", "
            "Hires negative prompt: \"blur, noise\", Version: v1.10.1")
    (tmp_path / "varied.png").write_bytes(encode_png(_pictures(1)[0], text))
    page.click("#tab-pnginfo")
    page.set_input_files("#png_file", str(tmp_path / "varied.png"))
    page.wait_for_function("document.getElementById('png_text').textContent.startsWith("
                           "'a green square')")
    page.click("#png_to_txt2img")
    fields = ("#seed", "#subseed", "#subseed_strength", "#seed_resize_from_w",
              "#seed_resize_from_h", "#hr_scale", "#hr_second_pass_steps", "#hr_upscaler",
              "#hr_denoising_strength", "#hr_sampler_name", "#hr_prompt", "#hr_negative_prompt")
    assert {k: page.input_value(k) for k in fields} == {
        "#seed": "42", "#subseed": "77", "#subseed_strength": "0.25",
        "#seed_resize_from_w": "40", "#seed_resize_from_h": "24", "#hr_scale": "2",
        "#hr_second_pass_steps": "3", "#hr_upscaler": "Latent (nearest)",
        "#hr_denoising_strength": "0.4", "#hr_sampler_name": "DPM++ 2M Karras",
        "#hr_prompt": "a green square, sharp", "#hr_negative_prompt": "blur, noise"}
    assert page.is_checked("#enable_hr") and page.is_visible("#variation_box")
    answer = json.dumps({"images": [], "parameters": {}, "info": json.dumps(
        {"all_seeds": [], "infotexts": [], "width": 32, "height": 32})})
    pattern = re.compile(r".*/sdapi/v1/txt2img$")
    page.route(pattern, lambda route: route.fulfill(status=200, body=answer,
                                                    content_type="application/json"))
    try:
        with page.expect_request(lambda r: r.url.endswith("/sdapi/v1/txt2img")) as req:
            page.click("#generate")
        body = req.value.post_data_json
        page.wait_for_function("!document.getElementById('generate').disabled")
    finally:
        page.unroute(pattern)
        page.uncheck("#enable_hr")
        page.fill("#subseed_strength", "0")
    sent = {k: body[k] for k in ("prompt", "seed", "subseed", "subseed_strength",
                                 "seed_resize_from_w", "seed_resize_from_h", "enable_hr",
                                 "hr_scale", "hr_second_pass_steps", "hr_upscaler",
                                 "denoising_strength", "steps", "sampler_name",
                                 "hr_sampler_name", "hr_prompt", "hr_negative_prompt")}
    assert sent == {"prompt": "a green square", "seed": 42, "subseed": 77,
                    "subseed_strength": 0.25, "seed_resize_from_w": 40,
                    "seed_resize_from_h": 24, "enable_hr": True, "hr_scale": 2,
                    "hr_second_pass_steps": 3, "hr_upscaler": "Latent (nearest)",
                    "denoising_strength": 0.4, "steps": 4, "sampler_name": "Euler a",
                    "hr_sampler_name": "DPM++ 2M Karras", "hr_prompt": "a green square, sharp",
                    "hr_negative_prompt": "blur, noise"}
    assert body["force_task_id"].startswith("task(")



def _answer_from(page, server, fakes: dict[str, str]):
    """The page's requests to ``fakes``' paths (path and query) answered with their JSON
    bodies by the browser, the server never asked; returns the route's pattern (unroute it)."""
    pattern = re.compile(".*(" + "|".join(re.escape(server.url + p) for p in fakes) + ")$")
    page.route(pattern, lambda route: route.fulfill(
        status=200, content_type="application/json",
        body=fakes[route.request.url.split(server.url)[1]]))
    return pattern

@needs_chromium
def test_web_page_shows_hires_variations_and_controlnet_only_when_served(page, server):
    """The page's side of features other branches serve: hidden above (this server refuses
    them); here the routes that report them are answered as a server that serves them would,
    and the request the page sends is checked (and answered without generating)."""
    features = {**server.client.get("/sdjax/v1/features").json(), "hires": True,
                "tiling": True, "variations": True, "controlnet": True}
    answer = json.dumps({"images": [], "parameters": {}, "info": json.dumps(
        {"all_seeds": [], "infotexts": [], "width": 16, "height": 16})})
    fakes = {"/sdjax/v1/features": json.dumps(features),
             "/controlnet/model_list": json.dumps({"model_list": ["control_canny [abc]"]}),
             "/controlnet/module_list": json.dumps({"module_list": ["none", "canny"]}),
             "/sdapi/v1/txt2img": answer}
    pattern = _answer_from(page, server, fakes)
    try:
        page.reload()
        page.wait_for_function("document.getElementById('status').textContent"
                               ".startsWith('toy:')")
        page.wait_for_function("!document.getElementById('controlnet_box').hidden")
        for box in ("#hires_box", "#variation_box"):
            assert page.is_visible(box), box
        page.check("#enable_hr")
        page.check("#tiling")
        page.fill("#hr_scale", "1.5")
        page.fill("#subseed", "99")
        page.fill("#subseed_strength", "0.3")
        page.check("#cn_enabled")
        page.select_option("#cn_module", "canny")
        page.fill("#cn_weight", "0.8")
        with page.expect_request(lambda r: r.url.endswith("/sdapi/v1/txt2img")) as req:
            page.click("#generate")
        body = req.value.post_data_json
        assert (body["enable_hr"], body["hr_scale"], body["hr_upscaler"]) == (True, 1.5, "Latent")
        # left empty: the first pass's sampler and prompts, as the WebUI's API defaults
        assert (body["hr_sampler_name"], body["hr_prompt"], body["hr_negative_prompt"]) == (
            None, "", "")
        assert (body["subseed"], body["subseed_strength"], body["tiling"]) == (99, 0.3, True)
        unit = body["alwayson_scripts"]["controlnet"]["args"][0]
        assert (unit["module"], unit["model"], unit["weight"], unit["control_mode"]) == (
            "canny", "control_canny [abc]", 0.8, "Balanced")
        # another mode hides what only txt2img takes
        page.click("#tab-img2img")
        assert page.is_hidden("#hires_box") and page.is_visible("#controlnet_box")
    finally:
        page.unroute(pattern)


@pytest.fixture(scope="module")
def sd1_library(sd1_controlnets):
    """The ControlNets of this module's tests: one library, so that its programs (kept per
    set of ControlNets attached) serve the page's test too."""
    from sdjax.serve.controlnets import ControlNetLibrary
    return ControlNetLibrary({"cn0": str(sd1_controlnets[0]), "cn1": str(sd1_controlnets[1])})


def test_controlnet_units_through_the_webui_api(server, registry, sd1_library):
    """The ControlNet extension's API: its routes' shapes, a txt2img unit made bit for bit as
    ``pipe(...)`` makes it (with the extension's infotext, read back by png-info), the planned
    calls of other units (no compile), and bad units as one-line 422s."""
    from sdjax.controlnet import preprocess
    from sdjax.outputs import PipelineOutput
    from sdjax.serve.controlnets import ControlNetLibrary
    from sdjax.serve.samplers import sampler_settings
    c, tiny = server.client, registry.get("tiny")
    registry.controlnets = sd1_library
    try:
        assert c.get("/controlnet/version").json() == {"version": 2}
        titles = c.get("/controlnet/model_list").json()["model_list"]
        assert [re.fullmatch(r"(cn\d) \[[0-9a-f]{8}\]", t).group(1) for t in titles] == [
            "cn0", "cn1"]
        assert c.get("/controlnet/module_list").json()["module_list"][:3] == [
            "none", "invert", "canny"]
        assert "invert (from white bg & black line)" in c.get(
            "/controlnet/module_list", params={"alias_names": True}).json()["module_list"]
        assert c.get("/sdjax/v1/features").json()["controlnet"] is True
        rng = np.random.default_rng(0)
        image = rng.integers(0, 256, (16, 16, 3), np.uint8)
        big = rng.integers(0, 256, (40, 56, 3), np.uint8)
        b64 = _b64(image)
        for key in ("controlnet_input_images", "controlnet_images"):
            r = c.post("/controlnet/detect", json={
                "controlnet_module": "canny", key: [_b64(big)],
                "controlnet_processor_res": 32, "controlnet_threshold_a": 50,
                "controlnet_threshold_b": 150})
            assert r.status_code == 200 and r.json()["info"] == "Success", r.text
            np.testing.assert_array_equal(
                np.asarray(_decode(r.json()["images"][0]).convert("RGB")),
                preprocess("canny", big, processor_res=32, low_threshold=50,
                           high_threshold=150))
        # One real generation: a WebUI-style unit ("ControlNet" as clients spell it; a
        # disabled unit with a bad model is ignored) is pipe(...)'s ControlNet call.
        unit = {"enabled": True, "module": "invert", "model": titles[0], "weight": 0.7,
                "image": b64, "resize_mode": "Just Resize", "guidance_start": 0.0,
                "guidance_end": 0.5, "control_mode": "My prompt is more important",
                "processor_res": -1, "threshold_a": -1, "threshold_b": -1,
                "pixel_perfect": False}
        body = {**SHAPE, "prompt": "a cat", "seed": 3, "cfg_scale": 7,
                "override_settings": {"sd_model_checkpoint": "tiny"},
                "alwayson_scripts": {"ControlNet": {"args": [
                    unit, {"enabled": False, "model": "nope"}]}}}
        r = c.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200, r.text
        scheduler, schedule_type = sampler_settings("Euler a")
        expected = tiny(["a cat"], seeds=[3], image_indices=[0], height=16, width=16,
                        num_inference_steps=2, scheduler=scheduler, guidance_scale=[7.0],
                        rng="nv", control_image=255 - image, controlnet_conditioning_scale=0.7,
                        control_guidance_end=0.5, control_mode="prompt",
                        batch_size_per_device=MAX_BATCH,
                        **({} if schedule_type is None else {"schedule_type": schedule_type}))
        png = _decode(r.json()["images"][0])
        np.testing.assert_array_equal(np.asarray(png.convert("RGB")), expected.images[0])
        fields = ("Module: invert, Model: " + titles[0] + ", Weight: 0.7, Resize Mode: Just "
                  "Resize, Guidance Start: 0.0, Guidance End: 0.5, Pixel Perfect: False, "
                  "Control Mode: My prompt is more important")
        assert f'ControlNet 0: "{fields}"' in png.info["parameters"]
        info = c.post("/sdapi/v1/png-info", json={"image": r.json()["images"][0]}).json()
        assert info["parameters"]["ControlNet 0"] == fields
        assert (info["parameters"]["ControlNet 0 module"],
                info["parameters"]["ControlNet 0 weight"]) == ("invert", 0.7)
        # The planned calls of other units (not run): two ControlNets, canny with pixel
        # perfect, a control mode as a number; img2img's unit without an image takes the
        # init image.
        seen = []

        class Done:
            def result(self):
                return PipelineOutput(images=np.zeros((1, 16, 16, 3), np.uint8), seeds=[3])

        tiny.submit = lambda call: seen.append(call) or Done()
        try:
            canny = {"module": "canny", "model": "cn1", "image": _b64(big), "weight": 1.5,
                     "pixel_perfect": True, "threshold_a": 50, "threshold_b": 150,
                     "control_mode": 2}
            r = c.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"controlnet": {
                "args": [{**unit, "resize_mode": 0}, canny]}}})
            assert r.status_code == 200, r.text
            r2 = c.post("/sdapi/v1/img2img", json={
                **body, "init_images": [b64], "denoising_strength": 0.5,
                "alwayson_scripts": {"controlnet": {"args": [{"model": "cn0"}]}}})
            assert r2.status_code == 200, r2.text
        finally:
            del tiny.submit
        two, one = seen
        assert tiny.controlnets == [sd1_library.sources["cn0"]]  # the last call's set
        np.testing.assert_array_equal(two.control_image[0][0], 255 - image)
        # pixel perfect: canny at 40 * max(16/40, 16/56) = 16 (16x22), then "Crop and
        # Resize" keeps the centre at the output's aspect ratio
        edges = preprocess("canny", big, processor_res=16, low_threshold=50,
                           high_threshold=150)
        assert edges.shape == (16, 22, 3)
        np.testing.assert_array_equal(two.control_image[1][0], edges[:, 3:19])
        assert (two.controlnet_conditioning_scale, two.control_mode) == (
            [[0.7], [1.5]], [["prompt"], ["controlnet"]])
        assert 'ControlNet 1: "Module: canny, Model: ' + titles[1] + ", Weight: 1.5, " \
            "Resize Mode: Crop and Resize, Processor Res: 512, Threshold A: 50, Threshold " \
            "B: 150, Guidance Start: 0.0, Guidance End: 1.0, Pixel Perfect: True, Control " \
            'Mode: ControlNet is more important"' in _decode(
                r.json()["images"][0]).info["parameters"]
        np.testing.assert_array_equal(one.control_image[0], image)
        assert one.control_mode == [["balanced"]] and one.task_inputs is not None
        # Requests that differ in their units' images, weights, windows and modes share a
        # call's shape; each image keeps its own values.
        from sdjax.serve.controlnet_api import call_images
        from sdjax.serve.generation import plan_txt2img
        from sdjax.serve.schemas import Txt2ImgRequest
        other = {**unit, "image": _b64(big), "weight": 0.2, "guidance_start": 0.25,
                 "control_mode": 1}
        plans = [plan_txt2img(Txt2ImgRequest(**{**body, "alwayson_scripts": {
            "controlnet": {"args": [u]}}}), registry, Limits())
            for u in (unit, other)]
        assert plans[0].shape == plans[1].shape
        merged = call_images(plans[0].specs + plans[1].specs)
        assert (merged["controlnet_conditioning_scale"], merged["control_guidance_start"],
                merged["control_mode"]) == ([[0.7, 0.2]], [[0.0, 0.25]],
                                            [["prompt", "prompt"]])
        assert [a.shape for a in merged["control_image"]] == [(16, 16, 3), (40, 56, 3)]
        # shuffle's flow from the extension's NumPy seed: the request's seed + its subseed
        # (-1: the seed again), at its fixed 512 (the unit's processor_res is not its)
        for extra, numpy_seed in (({}, 6), ({"subseed": 10}, 13)):
            plan = plan_txt2img(Txt2ImgRequest(**{**body, **extra, "alwayson_scripts": {
                "controlnet": {"args": [{**other, "module": "shuffle", "processor_res": 64}]}}}),
                registry, Limits())
            np.testing.assert_array_equal(
                plan.specs[0].control_images[0][0],
                preprocess("shuffle", big, processor_res=512, seed=numpy_seed))
        # Bad units: one-line 422s naming the field.
        bad = [({"module": "depth"}, "unknown module 'depth'"),
               ({"model": "nope [12345678]"}, "unknown model 'nope [12345678]'"),
               ({"guidance_start": 0.5, "guidance_end": 0.5}, "must be below"),
               ({"weight": float("nan")}, "weight"),
               ({"control_mode": "Loud"}, "control_mode"),
               ({"resize_mode": "Resize and Fill"}, "not supported"),
               ({"image": None}, "give a base64 control image")]
        for fields, message in bad:
            r = c.post("/sdapi/v1/txt2img", content=json.dumps({
                **body, "alwayson_scripts": {"controlnet": {"args": [{**unit, **fields}]}}}))
            assert r.status_code == 422 and message in r.json()["detail"], (fields, r.text)
            assert "\n" not in r.json()["detail"]
    finally:
        registry.controlnets.use(tiny, ())
        registry.controlnets = ControlNetLibrary({})


def test_controlnet_detect_runs_the_extensions_model_free_preprocessors(server):
    """/controlnet/module_list lists the extension's preprocessors that need no network (its
    UI's names with alias_names=true, its sliders in module_detail); /controlnet/detect runs
    them with the extension's reading of its parameters: -1 or a threshold outside its
    slider's range (webuiapi sends 64 for every module) is the default; a threshold that is
    not a number is a one-line 422."""
    from sdjax.controlnet import preprocess
    c = server.client
    listed = c.get("/controlnet/module_list").json()
    assert listed["module_list"] == [
        "none", "invert", "canny", "tile_resample", "blur_gaussian", "threshold", "color",
        "lineart_standard", "scribble_xdog", "shuffle", "binary"]
    aliases = c.get("/controlnet/module_list", params={"alias_names": True}).json()
    assert {"t2ia_color_grid", "lineart_standard (from white bg & black line)"} <= set(
        aliases["module_list"])
    assert listed["module_detail"]["blur_gaussian"]["sliders"] == [
        {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8},
        {"name": "Sigma", "value": 9.0, "min": 0.01, "max": 64.0, "step": 0.01}]
    big = np.random.default_rng(1).integers(0, 256, (40, 56, 3), np.uint8)
    calls = [({"controlnet_module": "t2ia_color_grid", "controlnet_processor_res": 64},
              preprocess("color", big, processor_res=64)),
             ({"controlnet_module": "tile_resample", "controlnet_threshold_a": 2.0},
              preprocess("tile_resample", big, threshold_a=2.0)),
             ({"controlnet_module": "tile_resample", "controlnet_threshold_a": 64},
              big),  # out of the rate's [1, 8]: its default 1, the image as it is
             ({"controlnet_module": "scribble_xdog", "controlnet_processor_res": 48,
               "controlnet_threshold_a": -1, "controlnet_threshold_b": 64},
              preprocess("scribble_xdog", big, processor_res=48, threshold_a=32))]
    for fields, expected in calls:
        r = c.post("/controlnet/detect", json={**fields, "controlnet_input_images": [
            _b64(big)]})
        assert r.status_code == 200, (fields, r.text)
        np.testing.assert_array_equal(
            np.asarray(_decode(r.json()["images"][0]).convert("RGB")), expected)
    for fields, message in (({"controlnet_module": "threshold", "controlnet_threshold_a": "x"},
                             "controlnet_threshold_a must be a number"),
                            ({"controlnet_module": "blur_gaussian",
                              "controlnet_processor_res": 1.5}, "processor_res must be a "
                             "whole number"),
                            ({"controlnet_module": "depth_midas"}, "unknown module")):
        r = c.post("/controlnet/detect", json={**fields, "controlnet_input_images": [
            _b64(big)]})
        assert r.status_code == 422 and message in r.json()["detail"], (fields, r.text)
        assert "\n" not in r.json()["detail"]


@needs_chromium
def test_webuiapi_client_sends_a_controlnet_unit(server, registry, sd1_library):
    """A real WebUI client (the ``webuiapi`` package, as scripts and bots use it) sends its
    whole txt2img body (every field it always sends, eta and the hires ones included) with a
    ControlNet unit of its own making: the image is ``pipe(...)``'s ControlNet call, the same
    compiled shape as test_controlnet_units_through_the_webui_api's."""
    webuiapi = pytest.importorskip("webuiapi")
    from sdjax.serve.controlnets import ControlNetLibrary
    from sdjax.serve.samplers import sampler_settings
    tiny = registry.get("tiny")
    registry.controlnets = sd1_library
    try:
        api = webuiapi.WebUIApi(baseurl=f"{server.url}/sdapi/v1")
        title = server.client.get("/controlnet/model_list").json()["model_list"][0]
        image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8)
        unit = webuiapi.ControlNetUnit(image=Image.fromarray(image), module="invert",
                                       model=title, weight=0.7, guidance_end=0.5,
                                       control_mode=1, resize_mode="Just Resize")
        result = api.txt2img(prompt="a cat", seed=3, cfg_scale=7, steps=2, width=16,
                             height=16, sampler_name="Euler a", controlnet_units=[unit],
                             override_settings={"sd_model_checkpoint": "tiny"})
        scheduler, schedule_type = sampler_settings("Euler a")
        expected = tiny(["a cat"], seeds=[3], image_indices=[0], height=16, width=16,
                        num_inference_steps=2, scheduler=scheduler, guidance_scale=[7.0],
                        rng="nv", control_image=255 - image,
                        controlnet_conditioning_scale=0.7, control_guidance_end=0.5,
                        control_mode="prompt", batch_size_per_device=MAX_BATCH,
                        **({} if schedule_type is None else {"schedule_type": schedule_type}))
    finally:
        registry.controlnets.use(tiny, ())
        registry.controlnets = ControlNetLibrary({})
    np.testing.assert_array_equal(np.asarray(result.image.convert("RGB")), expected.images[0])
    assert result.info["all_seeds"] == [3]
    assert 'ControlNet 0: "Module: invert, Model: ' + title in result.info["infotexts"][0]


def test_web_page_runs_a_controlnet_unit(page, server, registry, sd1_library, tmp_path):
    """A server with a (tiny, random) ControlNet: the page's unit uploads a control image,
    shows its preprocessor's map (/controlnet/detect), and sends the unit with its weight,
    window and control mode; the image that comes back is the pipeline's ControlNet call's."""
    from sdjax.controlnet import preprocess
    from sdjax.serve.controlnets import ControlNetLibrary
    from sdjax.serve.samplers import sampler_settings
    if SCREENSHOTS:  # the toy at its defaults, with a ControlNet made from its UNet
        from tests.tiny_models import save_tiny_controlnet
        toy = Path(__file__).parents[1] / "sdjax" / "assets" / "toy"
        model, library = "toy", ControlNetLibrary({"cn0": str(save_tiny_controlnet(
            tmp_path / "toy-cn", toy, embedding_channels=(8, 16, 32)))})
    else:  # the program test_controlnet_units_through_the_webui_api compiled
        model, library = "tiny", sd1_library
    target = registry.get(model)
    control = _circle(S)
    Image.fromarray(control).save(tmp_path / "control.png")
    registry.controlnets = library
    try:
        page.reload()
        page.wait_for_function("document.getElementById('status').textContent"
                               ".startsWith('toy:')")
        if model != "toy":
            page.select_option("#model", model)
            page.wait_for_function("document.getElementById('status').textContent"
                                   f".startsWith('{model}:')", timeout=60_000)
        _shape(page, "txt2img")
        page.wait_for_function("!document.getElementById('controlnet_box').hidden")
        for field, value in (("#prompt", "a cat"), ("#seed", "3"), ("#cfg_scale", "7"),
                             ("#batch_size", "1")):
            page.fill(field, value)
        page.check("#cn_enabled")
        page.set_input_files("#cn_file", str(tmp_path / "control.png"))
        page.select_option("#cn_module", "invert")
        page.wait_for_function("document.getElementById('cn_file').files.length === 1")
        page.click("#cn_detect")
        page.wait_for_function("!document.getElementById('cn_map').hidden && "
                               "document.getElementById('cn_map').naturalWidth > 0")
        shown = page.get_attribute("#cn_map", "src").split(",", 1)[1]
        np.testing.assert_array_equal(np.asarray(_decode(shown).convert("RGB")),
                                      preprocess("invert", control))
        page.fill("#cn_weight", "0.7")
        page.fill("#cn_end", "0.5")
        page.select_option("#cn_control_mode", "My prompt is more important")
        body = _run(page, "/sdapi/v1/txt2img", 1)
        unit, = body["alwayson_scripts"]["controlnet"]["args"]
        assert (unit["module"], unit["weight"], unit["guidance_start"], unit["guidance_end"],
                unit["control_mode"]) == ("invert", 0.7, 0, 0.5, "My prompt is more important")
        assert re.fullmatch(r"cn0 \[[0-9a-f]{8}\]", unit["model"])
        np.testing.assert_array_equal(np.asarray(_decode(unit["image"]).convert("RGB")),
                                      control)
        assert 'ControlNet 0: "Module: invert, Model: cn0' in page.inner_text("#parameters")
        _screenshots(page, "controlnet", tmp_path)
        scheduler, schedule_type = sampler_settings(PAGE_SHAPE["sampler_name"])
        expected = target(["a cat"], seeds=[3], image_indices=[0], height=S, width=S,
                          num_inference_steps=PAGE_SHAPE["steps"], scheduler=scheduler,
                          guidance_scale=[7.0], rng="nv", control_image=255 - control,
                          controlnet_conditioning_scale=0.7, control_guidance_end=0.5,
                          control_mode="prompt", batch_size_per_device=MAX_BATCH,
                          **({} if schedule_type is None else {"schedule_type": schedule_type}))
        made = page.get_attribute("#gallery a >> nth=0", "href").split(",", 1)[1]
        np.testing.assert_array_equal(np.asarray(_decode(made).convert("RGB")),
                                      expected.images[0])
    finally:
        registry.controlnets.use(target, ())
        registry.controlnets = ControlNetLibrary({})
        page.reload()  # the server's model, and no ControlNet unit any more
        page.wait_for_function("document.getElementById('status').textContent"
                               ".startsWith('toy:')", timeout=60_000)


@needs_chromium
def test_web_page_shows_its_queue_position_then_step_and_preview(page, server):
    """The page asks /internal/progress about its own request (its force_task_id): "queued:
    N ahead" while it waits, then the loop's step and the live preview (the call here is a
    stand-in that reports one step, so nothing compiles)."""
    import threading
    b, c = server.batcher, server.client
    go = threading.Event()
    frames = np.zeros((1, 4, 4, 3), np.uint8)
    frames[..., 0] = 255

    def held(shape, specs):
        b.report(1, 2, frames)
        go.wait(30)
        return np.zeros((len(specs), 16, 16, 3), np.uint8)

    run, b._run, b.window_s = b._run, held, 60
    try:
        with page.expect_response(lambda r: r.url.endswith("/sdapi/v1/options")):
            page.check("#live_previews")  # the server's option, as the WebUI's settings
        assert c.get("/sdapi/v1/options").json()["live_previews_enable"] is True
        _shape(page, "txt2img")
        page.fill("#batch_size", "1")
        before = page.locator("#gallery img").count()
        page.click("#generate")
        page.wait_for_function("document.getElementById('status').textContent === "
                               "'queued: 0 ahead'", timeout=30_000)
        with b._cond:  # a full batch: the call starts now, not after the 60 s window
            b.max_batch = 1
            b._cond.notify_all()
        page.wait_for_function("!document.getElementById('preview').hidden", timeout=30_000)
        steps = PAGE_SHAPE["steps"]  # 1 of the call's 2 evaluations, in the request's steps
        assert f"step {round(steps / 2)}/{steps}" in page.inner_text("#status")
        shown = page.get_attribute("#preview", "src")
        assert shown.startswith("data:image/png;base64,")
        np.testing.assert_array_equal(np.asarray(_decode(shown.split(",", 1)[1])), frames[0])
        go.set()
        page.wait_for_function(f"document.querySelectorAll('#gallery img').length === "
                               f"{before + 1}", timeout=30_000)
        assert page.is_hidden("#preview")
        page.uncheck("#live_previews")
    finally:
        go.set()
        b._run, b.window_s, b.max_batch = run, 0.05, 8
        c.post("/sdapi/v1/options", json={"live_previews_enable": False})


@needs_chromium
def test_web_page_upscales_with_the_x4_upscaler(page, server, registry, request, tmp_path):
    """A model that is the x4 upscaler: its own tab instead of the three generation tabs, and
    Upscale sends img2img with the image only (its size the image's; no mask, no strength).
    SDJAX_PAGE_SCREENSHOTS runs the tiny upscaler (8x8 -> 32x32, 2 steps) for the docs'
    screenshot; the suite answers its model list, defaults and request as such a server would
    (no load, no compile: no other test of this module compiles the upscaler)."""
    real = bool(SCREENSHOTS)
    picture = _circle(8)
    Image.fromarray(picture).save(tmp_path / "low.png")
    models = server.client.get("/sdapi/v1/sd-models").json()
    fakes = {"/sdapi/v1/sd-models": json.dumps(models + [{**models[0], "title": "upscaler",
                                                          "model_name": "upscaler"}]),
             "/sdjax/v1/model-defaults?model=upscaler": json.dumps(
                 {"model": "upscaler", "width": None, "height": None, "steps": 75,
                  "cfg_scale": 9.0, "sampler_name": "DDIM", "upscaler": True, "sdxl": False}),
             "/sdapi/v1/img2img": json.dumps({"images": [], "parameters": {}, "info": json.dumps(
                 {"all_seeds": [], "infotexts": [], "width": 32, "height": 32})})}
    if real:
        registry.sources["upscaler"] = str(request.getfixturevalue("upscaler_folder"))
    else:
        pattern = _answer_from(page, server, fakes)
    try:
        page.reload()
        page.wait_for_function("document.getElementById('status').textContent"
                               ".startsWith('toy:')")
        assert page.is_hidden("#tab-upscale")
        page.select_option("#model", "upscaler")
        page.wait_for_function("document.getElementById('status').textContent"
                               ".startsWith('upscaler: x4 upscaler')", timeout=60_000)
        assert page.get_attribute("#tab-upscale", "aria-selected") == "true"
        for tab in ("txt2img", "img2img", "inpaint"):
            assert page.is_hidden(f"#tab-{tab}"), tab
        for box in ("#width", "#denoising_strength", "#hires_box", "#mask_tools"):
            assert page.is_hidden(box), box
        assert page.inner_text("#generate") == "Upscale"
        page.set_input_files("#init_file", str(tmp_path / "low.png"))
        page.wait_for_function("document.getElementById('init_image').naturalWidth === 8")
        page.fill("#prompt", "a red circle on a blue background")
        page.fill("#steps", "2")
        page.fill("#seed", "1")
        page.fill("#batch_size", "1")
        if real:
            body = _run(page, "/sdapi/v1/img2img", 1)
            assert page.evaluate("document.querySelector('#gallery img').naturalWidth") == 32
            _screenshots(page, "upscale", tmp_path)
        else:
            with page.expect_request(lambda r: r.url.endswith("/sdapi/v1/img2img")) as req:
                page.click("#generate")
            body = req.value.post_data_json
            page.wait_for_function("!document.getElementById('generate').disabled")
        np.testing.assert_array_equal(np.asarray(_decode(body["init_images"][0])), picture)
        assert (body["width"], body["height"], body["steps"]) == (8, 8, 2)
        assert body["override_settings"]["sd_model_checkpoint"] == "upscaler"
        assert "mask" not in body and "denoising_strength" not in body
    finally:
        if real:
            del registry.sources["upscaler"]
        else:
            page.unroute(pattern)
        page.reload()
        page.wait_for_function("document.getElementById('status').textContent"
                               ".startsWith('toy:')")
