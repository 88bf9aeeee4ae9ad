"""The WebUI's noise sources and variation seeds (sdjax/noise.py): ``nv`` against the WebUI's
own numpy NV generator (restated here, Box-Muller in float64), ``cpu`` against
``torch.randn`` with ``torch.Generator().manual_seed(seed)`` (the oracle), the WebUI's slerp
and seed resize, and a pipeline whose start noise is ``pipe.noise(...)`` bit for bit, with no
recompile when the subseeds or strengths change."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch

from sdjax import noise
from sdjax.pipeline import StableDiffusionPipeline

# ---------------------------------------------------------------- the WebUI's NV generator
# modules/rng_philox.py of AUTOMATIC1111/stable-diffusion-webui, restated: Philox4x32-10 on a
# (4, n) counter [offset, 0, index, 0] keyed by the uint64 seed's two words, then one
# Box-Muller value from the first two words, computed in float64 from float32 constants.
M = (0xD2511F53, 0xCD9E8D57)
W = (0x9E3779B9, 0xBB67AE85)
C1 = np.array([2.3283064e-10], np.float32)
C2 = np.array([2.3283064e-10 * 6.2831855], np.float32)


def _words(x: np.ndarray) -> np.ndarray:
    return x.view(np.uint32).reshape(-1, 2).T  # (low, high)


def webui_nv_randn(seed: int, shape: tuple[int, ...], offset: int = 0) -> np.ndarray:
    n = int(np.prod(shape))
    c = np.zeros((4, n), np.uint32)
    c[0], c[2] = offset, np.arange(n, dtype=np.uint32)
    key = _words(np.full(n, seed, np.uint64)).copy()
    for r in range(10):
        if r:
            key[0] += np.uint32(W[0])
            key[1] += np.uint32(W[1])
        v1 = _words(c[0].astype(np.uint64) * M[0])
        v2 = _words(c[2].astype(np.uint64) * M[1])
        c = np.stack([v2[1] ^ c[1] ^ key[0], v2[0], v1[1] ^ c[3] ^ key[1], v1[0]])
    u = c[0] * C1 + C1 / 2  # float64, as numpy promotes uint32 x float32
    v = c[1] * C2 + C2 / 2
    return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32).reshape(shape)


def webui_slerp(val, low, high):
    """modules/rng.py's slerp, on torch (C, H, W) tensors."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return ((torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low
            + (torch.sin(val * omega) / so).unsqueeze(1) * high)


def test_nv_matches_the_webui_generator():
    np.testing.assert_allclose(webui_nv_randn(0, (4,)), [-0.92466, -0.42534, -2.64385,
                                                         0.14518], atol=1e-5)
    nv = jax.jit(noise.nv_randn, static_argnums=3)
    for seed, shape, offset in [(0, (3, 4), 0), (2**32 - 1, (4, 32, 24), 0),
                                (12345, (4, 9, 7), 3), (2**32 + 7, (4, 8, 8), 1)]:
        ours = nv(np.uint32(seed & 0xFFFFFFFF), np.uint32(seed >> 32), np.uint32(offset), shape)
        np.testing.assert_allclose(np.asarray(ours), webui_nv_randn(seed, shape, offset),
                                   atol=1e-5, rtol=0)


def test_cpu_matches_torch_randn():
    seeds = (0, 42, 2**32 - 1)
    for shape in [(5, 3), (16,), (4, 9, 7)]:  # torch's scalar path, 16-blocks, and its tail
        draw = jax.jit(jax.vmap(lambda s, shape=shape: noise.cpu_randn(noise.cpu_state(s),
                                                                     shape)[0]))
        ours = np.asarray(draw(np.array(seeds, np.uint32)))
        for seed, got in zip(seeds, ours, strict=True):
            want = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).numpy()
            np.testing.assert_allclose(got, want, atol=1e-6, rtol=0, err_msg=f"{seed} {shape}")
    # One generator drawn from again and again (the per-step noise): the state carries over,
    # torch's kept second normal of the scalar path included.
    shapes = [(5,), (3,), (40,), (7,), (700,), (2,)]

    @jax.jit
    def stream(seed):
        state, out = noise.cpu_state(seed), []
        for shape in shapes:
            x, state = noise.cpu_randn(state, shape)
            out.append(x)
        return out
    gen = torch.Generator().manual_seed(7)
    for shape, ours in zip(shapes, stream(np.uint32(7)), strict=True):
        np.testing.assert_allclose(np.asarray(ours), torch.randn(shape, generator=gen).numpy(),
                                   atol=1e-6, rtol=0)


def test_slerp_resize_and_per_step_noise_are_the_webuis():
    rs = np.random.default_rng(0)
    low, high = rs.standard_normal((2, 4, 6, 5)).astype(np.float32)  # (C, H, W)
    for val in (0.0, 0.3, 1.0):
        want = webui_slerp(val, torch.tensor(low), torch.tensor(high)).numpy()
        ours = noise.slerp(np.float32(val), low.transpose(1, 2, 0), high.transpose(1, 2, 0))
        np.testing.assert_allclose(np.asarray(ours).transpose(2, 0, 1), want, atol=1e-6)
    # Near-parallel noises take the WebUI's linear branch (its operands as it has them).
    near = webui_slerp(0.3, torch.tensor(low), torch.tensor(low * 1.0001)).numpy()
    ours = noise.slerp(np.float32(0.3), low.transpose(1, 2, 0), low.transpose(1, 2, 0) * 1.0001)
    np.testing.assert_allclose(np.asarray(ours).transpose(2, 0, 1), near, atol=1e-6)

    # seed_resize_from: the WebUI's ImageRNG.first on (C, H, W) with its dx/dy arithmetic.
    shape, sources = (6, 5, 4), [(4, 3), (8, 9), (3, 8)]  # ours (h, w, C)
    resized = jax.jit(lambda s: [noise.image_noise("nv", shape, s, np.uint32(0), None,
                                                   resize_from=r) for r in sources])
    for source, got in zip(sources, resized(np.uint32(11)), strict=True):
        x = webui_nv_randn(11, (4, 6, 5))
        small = webui_nv_randn(11, (4, *source))
        dx, dy = (5 - source[1]) // 2, (6 - source[0]) // 2
        w = source[1] if dx >= 0 else source[1] + 2 * dx
        h = source[0] if dy >= 0 else source[0] + 2 * dy
        tx, ty, dx, dy = max(dx, 0), max(dy, 0), max(-dx, 0), max(-dy, 0)
        x[:, ty:ty + h, tx:tx + w] = small[:, dy:dy + h, dx:dx + w]
        np.testing.assert_allclose(np.asarray(got).transpose(2, 0, 1), x, atol=1e-5)

    # Per-step noise: the seed's generator after its first draw; with ENSD a fresh one.
    seeds, idx = np.array([5, 9], np.uint32), np.array([0, 1], np.uint32)
    steps = jax.jit(lambda ensd: [noise.step_noise(rng, shape, seeds, idx,
                                                   {noise.ENSD: ensd}, k)
                                  for rng, k in (("nv", 2), ("cpu", 1))])
    for ensd, first in ((0, 1), (31337, 0)):
        nv, cpu = steps(np.full(2, ensd, np.uint32))
        for i, s in enumerate((5, 10)):
            want = webui_nv_randn(s + ensd, (4, 6, 5), first + 2)
            np.testing.assert_allclose(np.asarray(nv[i]).transpose(2, 0, 1), want, atol=1e-5)
            gen = torch.Generator().manual_seed(s + ensd)
            for _ in range(first + 1):
                torch.randn((4, 6, 5), generator=gen)
            want = torch.randn((4, 6, 5), generator=gen).numpy()
            np.testing.assert_allclose(np.asarray(cpu[i]).transpose(2, 0, 1), want, atol=1e-6)


@pytest.fixture(scope="module")
def pipe(sd1_folder):
    return StableDiffusionPipeline.from_pretrained(str(sd1_folder), dtype="float32",
                                                   num_devices=2)


def test_pipeline_draws_pipe_noise_and_variation_never_recompiles(pipe):
    """The sampler's start noise is pipe.noise's. The two are separate XLA programs: the same
    per-image code, compiled apart, agrees to float32 rounding (on XLA:CPU the plain nv and
    cpu draws come out bit for bit, the jax one within an ulp); the images are compared to
    the tiny UNet's amplification of that."""
    kw = dict(num_inference_steps=2, height=32, width=32, output_type="latent")
    close = dict(atol=1e-4, rtol=0)
    # nv: image i of a call uses seed + i, the WebUI's batch rule.
    nv = pipe.noise([7, 8], 32, 32, rng="nv")
    h, w, c = pipe.latent_shape(32, 32)
    np.testing.assert_allclose(nv[1].transpose(2, 0, 1), webui_nv_randn(8, (c, h, w)),
                               atol=1e-5)
    np.testing.assert_allclose(pipe(["a", "b"], seed=7, rng="nv", **kw).images,
                               pipe(["a", "b"], latents=nv, rng="nv", **kw).images, **close)
    cpu = pipe.noise([3], 32, 32, rng="cpu")
    np.testing.assert_allclose(cpu[0].transpose(2, 0, 1), torch.randn(
        (c, h, w), generator=torch.Generator().manual_seed(3)).numpy(), atol=1e-6)
    # jax (the default) is today's noise, (seed, i).
    key = jax.random.split(jax.random.fold_in(jax.random.key(np.uint32(7)), np.uint32(1)))[0]
    np.testing.assert_allclose(pipe.noise([7, 7], 32, 32, image_indices=[0, 1])[1],
                               jax.random.normal(key, (h, w, c)), atol=1e-6)
    # Variation seeds: strength 0 is no subseed; a new subseed or strength is a new input,
    # not a new program.
    np.testing.assert_allclose(pipe.noise([7, 8], 32, 32, subseeds=[1, 2], rng="nv"), nv,
                               atol=1e-5)
    var = dict(subseed=100, rng="nv", **kw)
    pipe(["a", "b"], seed=7, subseed_strength=0.0, **var)
    compiled = pipe.compile_count
    mixed = pipe(["a", "b"], seed=7, subseed_strength=[0.3, 1.0], **var).images
    pipe(["a", "b"], seed=7, subseed=5, subseed_strength=0.5, rng="nv", **kw)
    assert pipe.compile_count == compiled
    # Variation on: every image uses the seed, image i the subseed + i; strength 1 is the
    # subseed's own noise (slerp's end point).
    want = pipe.noise([7, 7], 32, 32, subseeds=[100, 101], subseed_strength=[0.3, 1.0],
                      rng="nv")
    np.testing.assert_allclose(mixed, pipe(["a", "b"], latents=want, rng="nv", **kw).images,
                               **close)
    np.testing.assert_allclose(want[1], pipe.noise([101], 32, 32, rng="nv")[0], atol=1e-5)
    # seed_resize_from in pixels: the seed's noise at 16x48 placed in the middle.
    resized = pipe.noise([7], 32, 32, seed_resize_from=(16, 48), rng="cpu")[0]
    f = 32 // h
    small = torch.randn((c, 16 // f, 48 // f), generator=torch.Generator().manual_seed(7))
    rows, cols, src_rows, src_cols = noise.resize_offsets((h, w), (16 // f, 48 // f))
    np.testing.assert_allclose(resized[rows, cols], small.numpy().transpose(1, 2, 0)[
        src_rows, src_cols], atol=1e-6)
    for bad, match in [(dict(subseed=1, subseed_strength=1.5), "subseed_strength"),
                       (dict(subseed_strength=0.5), "needs a subseed"),
                       (dict(subseed=1, subseed_strength=float("nan")), "finite"),
                       (dict(rng="gpu"), "rng"), (dict(seed_resize_from=(0, 8)), "seed_resize"),
                       (dict(eta_noise_seed_delta=-1), "eta_noise_seed_delta")]:
        with pytest.raises(ValueError, match=match):
            pipe("a", **bad, **kw)


def test_sample_cli_writes_the_webuis_noise_fields(sd1_folder, tmp_path, capsys):
    from PIL import Image

    from sdjax.images import parse_parameters
    from sdjax.sample import main
    argv = ["--model", str(sd1_folder), "--prompt", "a cat", "--steps", "2", "--num_devices",
            "1", "--rng", "nv", "--subseed", "5", "--subseed_strength", "0.25",
            "--seed_resize_from", "8,12", "--eta_noise_seed_delta", "31337"]
    rc = main([*argv, "--outdir", str(tmp_path / "out")])
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    meta = parse_parameters(Image.open(next((tmp_path / "out").glob("*.png"))).text[
        "parameters"])
    assert (meta["Variation seed"], meta["Variation seed strength"], meta["Seed resize from"],
            meta["ENSD"], meta["RNG"]) == ("5", "0.25", "12x8", "31337", "NV")
    # sdjax.generate records them per sample and in run.json.
    import tarfile

    from sdjax import generate
    (tmp_path / "p.txt").write_text("a cat\n")
    assert generate.main([*argv[:1], str(sd1_folder), *argv[4:], "--prompts",
                          str(tmp_path / "p.txt"), "--outdir", str(tmp_path / "ds"),
                          "--samples_per_shard", "1"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    given = {"rng": "nv", "subseed": 5, "subseed_strength": 0.25, "seed_resize_from": [8, 12],
             "eta_noise_seed_delta": 31337}
    assert json.loads((tmp_path / "ds" / "run.json").read_text())["settings"].items() >= \
        given.items()
    with tarfile.open(tmp_path / "ds" / "00000.tar") as tar:
        meta = json.loads(next(tar.extractfile(m) for m in tar if m.name.endswith(".json"))
                          .read())
    assert meta.items() >= given.items()
    assert main([*argv[:-8], "--subseed_strength", "1.5", "--subseed", "1",
                 "--outdir", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "--subseed_strength must be in [0, 1]" in err and err.count("\n") == 1
    assert not (tmp_path / "bad").exists()


def test_server_reads_the_webuis_noise_fields_and_options(sd1_folder):
    pytest.importorskip("pydantic")
    from types import SimpleNamespace

    from sdjax.images import parse_parameters
    from sdjax.pipeline import StableDiffusionPipeline
    from sdjax.serve.batcher import JobResult
    from sdjax.serve.generation import images_response, plan_txt2img
    from sdjax.serve.limits import BadRequest, Limits
    from sdjax.serve.noise_fields import check_options
    from sdjax.serve.schemas import Txt2ImgRequest

    # Planning a request loads the model (its defaults, tokenizer, size rule) but compiles
    # nothing.
    model = StableDiffusionPipeline.from_pretrained(str(sd1_folder), dtype="float32",
                                                    num_devices=1)
    registry = SimpleNamespace(find=lambda wanted: "toy", get=lambda title: model,
                               find_refiner=lambda name: None, lora_dir=None)

    def plan(options=None, **fields):
        req = Txt2ImgRequest(**{"prompt": "a cat", "seed": 10, "steps": 2, "width": 64,
                                "height": 64, "batch_size": 2, **fields})
        return req, plan_txt2img(req, registry, Limits(), options)

    # The WebUI's default source is its GPU one (nv), written as nothing; seeds seed + k.
    _, p = plan()
    assert p.shape.settings.noise.rng == "nv" and [s.seed for s in p.specs] == [10, 11]
    assert p.shape.settings.pipeline_kwargs()["rng"] == "nv"
    # Variation seeds: the seed for all, subseed + k; options and override_settings.
    req, p = plan({"randn_source": "CPU"}, subseed=40, subseed_strength=0.5,
                  seed_resize_from_h=48, seed_resize_from_w=80,
                  override_settings={"eta_noise_seed_delta": 31337})
    assert [(s.seed, s.subseed) for s in p.specs] == [(10, 40), (10, 41)]
    result = JobResult([np.zeros((64, 64, 3), np.uint8)] * 2, p.specs, [(0, 2)], False)
    info = json.loads(images_response(req, p, result)["info"])
    assert info["all_subseeds"] == [40, 41]
    fields = parse_parameters(info["infotexts"][1])
    assert (fields["Seed"], fields["Variation seed"], fields["Variation seed strength"],
            fields["Seed resize from"], fields["ENSD"], fields["RNG"]) == (
        "10", "41", "0.5", "80x48", "31337", "CPU")
    assert p.shape.settings.pipeline_kwargs()["seed_resize_from"] == (48, 80)
    for bad, match in [(dict(subseed_strength=2), "subseed_strength must be in"),
                       (dict(override_settings={"randn_source": "TPU"}), "randn_source")]:
        with pytest.raises(BadRequest, match=match):
            plan(**bad)
    with pytest.raises(BadRequest, match="eta_noise_seed_delta"):
        check_options({"eta_noise_seed_delta": "x"})
