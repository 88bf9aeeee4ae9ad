"""ControlNet on the sampling core, against diffusers' ControlNet pipelines in float32, on tiny
random ControlNets made from the tiny UNets with every weight randomized (zero convolutions
included), from the same noise. Each test compiles one program and checks several calls of
it: scale, window, guess mode, the images and the control mode are runtime inputs."""

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image

import sdjax
from sdjax.controlnet import inputs as control_inputs
from sdjax.pipeline import StableDiffusionPipeline
from sdjax.weights.controlnet_files import save_original
from sdjax.weights.errors import WeightsError
from tests.tiny_models import diffusers_scheduler

TOL = 2e-4  # max abs difference of [0, 1] pixels, as the other parity tests
STEPS = 3
SIZE = 32  # pixels; latents 16x16
PROMPTS = ["a red circle", "a blue square on a green background"]


def _control(seed: int, size=(40, 48)) -> np.ndarray:
    """A control image of another size than the output's (it is resized)."""
    return np.random.RandomState(seed).randint(0, 256, (*size, 3)).astype(np.uint8)


def _noise(seed: int = 0, size: int = SIZE) -> np.ndarray:
    return np.random.RandomState(seed).randn(2, size // 2, size // 2, 4).astype(np.float32)


def _pil(value):
    if isinstance(value, list):
        return [_pil(v) for v in value]
    return Image.fromarray(value) if isinstance(value, np.ndarray) else value


def _counting_compiles(fn, *args, **kwargs):
    """(fn's result, the XLA compiles it made)."""
    events = []

    def listener(name, *_, **__):
        if name == "/jax/core/compile/backend_compile_duration":
            events.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        out = fn(*args, **kwargs)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return out, len(events)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def patched_diffusers(monkeypatch_module):
    """diffusers' ControlNet img2img/inpaint modules with the test's noise and the VAE
    posterior mean (as tests/test_tasks.py)."""
    from diffusers.pipelines.controlnet import (
        pipeline_controlnet_img2img,
        pipeline_controlnet_inpaint,
    )
    state = {"noise": None}

    def randn_tensor(shape, **kwargs):
        return torch.from_numpy(state["noise"].transpose(0, 3, 1, 2).copy())

    def mean(encoder_output, generator=None, sample_mode="sample"):
        return encoder_output.latent_dist.mean

    for module in (pipeline_controlnet_img2img, pipeline_controlnet_inpaint):
        monkeypatch_module.setattr(module, "randn_tensor", randn_tensor)
        monkeypatch_module.setattr(module, "retrieve_latents", mean)
    return state


@pytest.fixture(scope="module")
def sd1(sd1_folder, sd1_controlnets):
    """(ours with one ControlNet, diffusers' with the same)."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    ref = StableDiffusionControlNetPipeline.from_pretrained(
        str(sd1_folder), controlnet=ControlNetModel.from_pretrained(str(sd1_controlnets[0])),
        safety_checker=None, requires_safety_checker=False)
    ours = StableDiffusionPipeline.from_pretrained(str(sd1_folder), dtype="float32",
                                                   num_devices=1,
                                                   controlnet=str(sd1_controlnets[0]))
    return ours, ref


def _reference(ref, scheduler, noise=None, state=None, **kwargs):
    ref.scheduler = diffusers_scheduler(scheduler, ref.scheduler.config)
    if state is not None:
        state["noise"] = noise
    else:
        kwargs["latents"] = torch.from_numpy(noise.transpose(0, 3, 1, 2).copy())
    kwargs = {k: _pil(v) for k, v in kwargs.items()}
    # Ours is 1.0 everywhere (DESIGN); diffusers' img2img and inpainting default to 0.8, 0.5.
    kwargs.setdefault("controlnet_conditioning_scale", 1.0)
    with torch.no_grad():
        return ref(PROMPTS, negative_prompt=["low quality"] * 2, num_inference_steps=STEPS,
                   guidance_scale=7.5, height=SIZE, width=SIZE, output_type="np",
                   **kwargs).images


def _ours(pipe, scheduler, noise, **kwargs):
    return pipe(PROMPTS, negative_prompt="low quality", num_inference_steps=STEPS,
                guidance_scale=7.5, height=SIZE, width=SIZE, latents=noise,
                scheduler=scheduler, output_type="float", **kwargs).images


def test_txt2img_matches_diffusers_and_never_recompiles(sd1):
    """One program: diffusers' images with the default arguments, a scale and a window, guess
    mode, a control image per prompt; changing any of them does not recompile."""
    ours, ref = sd1
    cases = [dict(image=_control(1)),
             dict(image=_control(2), controlnet_conditioning_scale=0.6,
                  control_guidance_start=0.25, control_guidance_end=0.75),
             dict(image=[_control(3), _control(4, (32, 32))], guess_mode=True)]
    errors, compiles = [], 0
    for k, case in enumerate(cases):
        expected = _reference(ref, "pndm", _noise(k), **case)
        kwargs = {("control_image" if key == "image" else key): v for key, v in case.items()}
        out, n = _counting_compiles(_ours, ours, "pndm", _noise(k), **kwargs)
        compiles += n if k else 0  # the first call compiles the program
        errors.append(float(np.abs(out - expected).max()))
    print("txt2img pndm: max abs pixel errors", ", ".join(f"{e:.1e}" for e in errors))
    assert max(errors) < TOL
    assert compiles == 0
    off = _ours(ours, "pndm", _noise(0), control_image=_control(1),
                controlnet_conditioning_scale=0.0)
    assert np.abs(off - _ours(ours, "pndm", _noise(0), control_image=_control(1))).max() > 0.05


def test_eight_devices_give_the_one_device_images(sd1, sd1_folder, sd1_controlnets):
    """A control image per prompt, sharded over 8 fake devices (14 of 16 rows padding) at
    the one-device call's 2 images per device: bitwise the images of the one-device program
    (the parity test's; docs/tpu-gpu.md#reproducibility)."""
    eight = StableDiffusionPipeline.from_pretrained(str(sd1_folder), dtype="float32",
                                                    num_devices=8,
                                                    controlnet=str(sd1_controlnets[0]))
    case = dict(control_image=[_control(3), _control(4, (32, 32))],
                controlnet_conditioning_scale=0.8, control_guidance_end=0.7)
    a = _ours(sd1[0], "pndm", _noise(0), **case)
    b = _ours(eight, "pndm", _noise(0), batch_size_per_device=2, **case)
    assert np.abs(a[0] - a[1]).max() > 0.05
    np.testing.assert_array_equal(a, b)


def test_control_modes_follow_the_webui_extension(sd1):
    """"prompt": the residuals scaled by 0.825 ** (12 - r); "controlnet": the same, on the
    conditional rows only (guess mode's zero unconditional residuals, without its ramp)."""
    w, uncond = control_inputs.weights([0.5, 1.0], [False, True], ["prompt", "controlnet"], 4)
    np.testing.assert_allclose(w[0], 0.5 * 0.825 ** (12 - np.arange(5)), rtol=1e-6)
    np.testing.assert_allclose(w[1], np.logspace(-1, 0, 5) * 0.825 ** (12 - np.arange(5)),
                               rtol=1e-6)
    assert list(uncond) == [1.0, 0.0]
    ours, _ = sd1
    base = _ours(ours, "pndm", _noise(0), control_image=_control(1))
    modes = {m: _ours(ours, "pndm", _noise(0), control_image=_control(1), control_mode=m)
             for m in ("prompt", "controlnet")}
    assert np.abs(modes["prompt"] - base).max() > 0.01
    assert np.abs(modes["controlnet"] - modes["prompt"]).max() > 0.01
    # A ControlNet's scale, window and mode may be one per image (the server's merged
    # calls): image i's inputs are those of a call with its values alone.
    from types import SimpleNamespace
    sched, cfg = ours._schedule(4, "pndm")[1], ours._controlnets[0][1]

    def prepared(n, **values):
        call = SimpleNamespace(**{**control_inputs.DEFAULTS, "control_image": _control(1),
                                  **values})
        return control_inputs.prepare(call, configs=[cfg], n_prompts=n, per_prompt=1,
                                      height=16, width=16, scheduler=sched, steps=4, start=0,
                                      init_images=None)

    merged = prepared(2, controlnet_conditioning_scale=[[0.5, 1.0]],
                      control_guidance_start=[[0.0, 0.5]], control_mode=[["prompt", "balanced"]])
    for i, (scale, start, mode) in enumerate([(0.5, 0.0, "prompt"), (1.0, 0.5, "balanced")]):
        alone = prepared(1, controlnet_conditioning_scale=scale, control_guidance_start=start,
                         control_mode=mode)
        for key in ("control_weights", "control_uncond", "control_keep"):
            np.testing.assert_array_equal(merged[key][i], alone[key][0])
    assert not np.array_equal(merged["control_keep"][0], merged["control_keep"][1])
    with pytest.raises(ValueError, match="3 values for 2 image"):
        prepared(2, controlnet_conditioning_scale=[[0.5, 1.0, 2.0]])


def test_two_controlnets_match_diffusers_multicontrolnet(sd1_folder, sd1_controlnets):
    """Each with its own image, scale and window, their residuals summed; the second
    scheduler of the txt2img parity."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    nets = [ControlNetModel.from_pretrained(str(f)) for f in sd1_controlnets]
    ref = StableDiffusionControlNetPipeline.from_pretrained(
        str(sd1_folder), controlnet=nets, safety_checker=None, requires_safety_checker=False)
    ours = StableDiffusionPipeline.from_pretrained(
        str(sd1_folder), dtype="float32", num_devices=1,
        controlnet=[str(f) for f in sd1_controlnets])
    assert ours.controlnets == [str(f) for f in sd1_controlnets]
    case = dict(image=[_control(5), _control(6)], controlnet_conditioning_scale=[0.8, 1.2],
                control_guidance_start=[0.0, 0.5], control_guidance_end=[0.5, 1.0])
    expected = _reference(ref, "euler", _noise(1), **case)
    out = _ours(ours, "euler", _noise(1), control_image=case.pop("image"), **case)
    err = float(np.abs(out - expected).max())
    print(f"two ControlNets, euler: max abs pixel error {err:.1e}")
    assert err < TOL


def test_img2img_matches_diffusers(sd1, sd1_folder, sd1_controlnets, patched_diffusers):
    """diffusers' StableDiffusionControlNetImg2ImgPipeline (the window over the evaluations
    that run); without a control image the init image is the control image."""
    from diffusers import StableDiffusionControlNetImg2ImgPipeline
    ours, ref_txt = sd1
    ref = StableDiffusionControlNetImg2ImgPipeline(**ref_txt.components)
    init = [_control(7, (SIZE, SIZE)), _control(8, (SIZE, SIZE))]
    errors = []
    for k, (strength, end) in enumerate([(0.75, 1.0), (0.5, 0.6)]):
        expected = _reference(ref, "pndm", _noise(k), patched_diffusers, image=init,
                              control_image=_control(9), strength=strength,
                              control_guidance_end=end)
        out = _ours(ours, "pndm", _noise(k), image=init, control_image=_control(9),
                    strength=strength, control_guidance_end=end)
        errors.append(float(np.abs(out - expected).max()))
    print("img2img: max abs pixel errors", ", ".join(f"{e:.1e}" for e in errors))
    assert max(errors) < TOL
    same = _ours(ours, "pndm", _noise(0), image=init, control_image=init)
    assert np.array_equal(same, _ours(ours, "pndm", _noise(0), image=init))


def _mask() -> np.ndarray:
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[:, SIZE // 2 + 3:] = 255
    m[2:9, 4:13] = 255
    return m


@pytest.mark.parametrize("model", ["9-channel", "4-channel"])
def test_inpainting_matches_diffusers(model, sd1, sd1_inpaint_folder, sd1_controlnets,
                                      patched_diffusers):
    from diffusers import ControlNetModel, StableDiffusionControlNetInpaintPipeline
    if model == "9-channel":
        ref = StableDiffusionControlNetInpaintPipeline.from_pretrained(
            str(sd1_inpaint_folder),
            controlnet=ControlNetModel.from_pretrained(str(sd1_controlnets[0])),
            safety_checker=None, requires_safety_checker=False)
        ours = StableDiffusionPipeline.from_pretrained(
            str(sd1_inpaint_folder), dtype="float32", num_devices=1,
            controlnet=str(sd1_controlnets[0]))
    else:
        ours, ref_txt = sd1
        ref = StableDiffusionControlNetInpaintPipeline(**ref_txt.components)
    init = [_control(10, (SIZE, SIZE)), _control(11, (SIZE, SIZE))]
    task = dict(image=init, mask_image=_mask(), control_image=_control(12), strength=0.75)
    expected = _reference(ref, "euler", _noise(2), patched_diffusers, **task)
    out = _ours(ours, "euler", _noise(2), **task)
    err = float(np.abs(out - expected).max())
    print(f"inpainting ({model} UNet): max abs pixel error {err:.1e}")
    assert err < TOL


def test_sdxl_matches_diffusers(sdxl_folder, sdxl_controlnet, sd1_controlnets):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline
    ref = StableDiffusionXLControlNetPipeline.from_pretrained(
        str(sdxl_folder), controlnet=ControlNetModel.from_pretrained(str(sdxl_controlnet)))
    ours = sdjax.StableDiffusionXLPipeline.from_pretrained(
        str(sdxl_folder), dtype="float32", num_devices=1, controlnet=str(sdxl_controlnet))
    size = 16
    noise = _noise(3, size)
    ref.scheduler = diffusers_scheduler("euler", ref.scheduler.config)
    with torch.no_grad():
        expected = ref(PROMPTS, negative_prompt=["low quality"] * 2,
                       image=Image.fromarray(_control(13)), num_inference_steps=3,
                       guidance_scale=7.5, height=size, width=size, output_type="np",
                       controlnet_conditioning_scale=0.7,
                       latents=torch.from_numpy(noise.transpose(0, 3, 1, 2).copy())).images
    out = ours(PROMPTS, negative_prompt="low quality", control_image=_control(13),
               num_inference_steps=3, guidance_scale=7.5, height=size, width=size,
               latents=noise, scheduler="euler", output_type="float",
               controlnet_conditioning_scale=0.7).images
    err = float(np.abs(out - expected).max())
    print(f"sdxl: max abs pixel error {err:.1e}")
    assert err < TOL
    # A ControlNet of another family, in one line naming both; the pipeline unchanged.
    with pytest.raises(WeightsError, match="is a ControlNet for 32-wide-context models; this "
                       r"pipeline's model is 80-wide-context \(with SDXL's added"):
        ours.load_controlnet(str(sd1_controlnets[0]))
    assert ours.controlnets == [str(sdxl_controlnet)]


def test_single_file_in_the_original_layout_loads_to_the_same_images(sd1, sd1_folder,
                                                                     sd1_controlnets,
                                                                     tmp_path):
    """Written in the original layout (with and without the control_model. prefix); loaded
    from it, the same parameters, and (running the folder's program) the same images."""
    ours, _ = sd1
    net = ours.store.network("controlnet_0")
    files = [save_original(tmp_path / "control_tiny.safetensors", net),
             save_original(tmp_path / "bare.safetensors", net, prefix="")]
    from sdjax.weights.safetensors_io import SafetensorsFile
    keys = set(SafetensorsFile(files[0]))
    assert {"control_model.input_hint_block.0.weight", "control_model.zero_convs.0.0.weight",
            "control_model.middle_block_out.0.weight",
            "control_model.input_blocks.1.1.proj_in.weight"} <= keys
    for path in files:
        other = StableDiffusionPipeline.from_pretrained(str(sd1_folder), dtype="float32",
                                                        num_devices=1, controlnet=str(path))
        a = jax.tree.leaves(ours.params["controlnet_0"])
        b = jax.tree.leaves(other.params["controlnet_0"])
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    other._compiled = ours._compiled  # the same program: no second compile of it
    out = _ours(other, "pndm", _noise(0), control_image=_control(1))
    assert np.array_equal(out, _ours(ours, "pndm", _noise(0), control_image=_control(1)))


def test_pth_bin_and_fp16_files_load_the_same_weights(sd1, sd1_controlnets, tmp_path):
    """The files people have besides safetensors: an original-layout ``.pth`` (a pickled
    state dict, read by the restricted unpickler), a diffusers folder with
    ``diffusion_pytorch_model.bin`` and one with only the ``fp16`` variant: the same
    parameters as the safetensors folder (fp16: rounded to half). A ``.pth`` whose pickle
    calls code is refused, naming the file, without running it."""
    from sdjax.weights.controlnet_files import load_controlnet, original_tensors
    from tests.pickles import hostile_checkpoint, payload

    ours, _ = sd1
    net = ours.store.network("controlnet_0")
    want = jax.tree.leaves(ours.params["controlnet_0"])
    base = ours.unet_config

    def leaves(source, **kw):
        return jax.tree.leaves(nnx.state(load_controlnet(source, base, **kw), nnx.Param))

    pth = tmp_path / "control_tiny.pth"
    torch.save({k: torch.from_numpy(v) for k, v in original_tensors(net).items()}, pth)
    folders = {}
    for name, stem in (("bin", "diffusion_pytorch_model.bin"),
                       ("fp16", "diffusion_pytorch_model.fp16.safetensors")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_bytes((sd1_controlnets[0] / "config.json").read_bytes())
        folders[name] = folder / stem
    from safetensors.numpy import load_file, save_file
    tensors = load_file(sd1_controlnets[0] / "diffusion_pytorch_model.safetensors")
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, folders["bin"])
    save_file({k: v.astype(np.float16) for k, v in tensors.items()}, folders["fp16"])

    for got in (leaves(pth), leaves(folders["bin"].parent)):
        assert all(np.array_equal(x, y) for x, y in zip(got, want, strict=True))
    half = leaves(folders["fp16"].parent, variant="fp16")
    assert all(np.array_equal(x, np.asarray(y).astype(np.float16).astype(np.float32))
               for x, y in zip(half, want, strict=True))

    marker = tmp_path / "ran"
    bad = hostile_checkpoint(tmp_path / "evil.pth", payload("os", "system", f"touch {marker}"))
    with pytest.raises(WeightsError, match="evil.pth"):
        load_controlnet(bad, base)
    assert not marker.exists()


def test_bad_controlnet_files_and_arguments(sd1, sd1_folder, sdxl_controlnet, tmp_path):
    ours, _ = sd1
    from sdjax.weights.safetensors_io import save_safetensors
    save_safetensors({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight":
                     np.zeros((4, 4), np.float32)}, tmp_path / "lora.safetensors")
    save_safetensors({"emb_params": np.zeros((2, 32), np.float32)},
                     tmp_path / "emb.safetensors")
    for path, match in ((tmp_path / "lora.safetensors", "is a LoRA, not a ControlNet"),
                        (tmp_path / "emb.safetensors", "embedding, not a ControlNet")):
        with pytest.raises(WeightsError, match=match):
            ours.load_controlnet(str(path))
    with pytest.raises(WeightsError, match="is a ControlNet for 80-wide-context .*SDXL.* "
                       "models; this pipeline's model is 32-wide-context$"):
        ours.load_controlnet(str(sdxl_controlnet))
    assert len(ours.controlnets) == 1
    plain = StableDiffusionPipeline.from_pretrained(str(sd1_folder), dtype="float32",
                                                    num_devices=1)
    call = dict(num_inference_steps=STEPS, height=SIZE, width=SIZE)
    bad = [
        (plain, dict(control_image=_control(1)), "control_image needs a ControlNet"),
        (ours, {}, "pass control_image="),
        (ours, dict(control_image=[_control(1), _control(2), _control(3)]),
         "3 images for one ControlNet"),
        (ours, dict(control_image="x.png"), "control_image must be a PIL image"),
        (ours, dict(control_image=np.zeros((0, 4, 3), np.uint8)), "control_image is empty"),
        (ours, dict(control_image=_control(1), control_guidance_start=0.5,
                    control_guidance_end=0.5), "must be below control_guidance_end"),
        (ours, dict(control_image=_control(1), control_guidance_end=1.5), r"in \[0, 1\]"),
        (ours, dict(control_image=_control(1), controlnet_conditioning_scale=-1),
         "must not be negative"),
        (ours, dict(control_image=_control(1), controlnet_conditioning_scale=float("nan")),
         "finite"),
        (ours, dict(control_image=_control(1), controlnet_conditioning_scale=[1.0, 2.0]),
         "2 values for 1 ControlNet"),
        (ours, dict(control_image=_control(1), control_mode="loud"), "control_mode"),
    ]
    for pipe, kwargs, match in bad:
        with pytest.raises((ValueError, TypeError), match=match):
            pipe(PROMPTS[0], **call, **kwargs)


def test_preprocessors_are_the_webui_extensions(monkeypatch):
    """"none" and "invert" as the extension; "canny" is OpenCV's Canny on the image resized to
    processor_res and padded to a multiple of 64 (here already so: OpenCV's own edges), the
    padding cropped off; OpenCV missing is one line."""
    import cv2
    img = _control(14, (64, 64))
    img[16:48, 16:48] = 250
    np.testing.assert_array_equal(sdjax.controlnet.preprocess("none", img), img)
    np.testing.assert_array_equal(sdjax.controlnet.preprocess("invert", img), 255 - img)
    edges = sdjax.controlnet.preprocess("canny", img, processor_res=64, low_threshold=50,
                                        high_threshold=150)
    expected = cv2.Canny(img, 50, 150)
    assert edges.shape == (64, 64, 3) and expected.any()
    np.testing.assert_array_equal(edges, np.repeat(expected[..., None], 3, axis=2))
    wide = sdjax.controlnet.preprocess("canny", _control(15, (40, 70)), processor_res=48)
    assert wide.shape == (48, 84, 3)  # short side at processor_res, padding cropped off
    with pytest.raises(ValueError, match="unknown preprocessor 'depth'"):
        sdjax.controlnet.preprocess("depth", img)
    monkeypatch.setitem(__import__("sys").modules, "cv2", None)
    with pytest.raises(ImportError, match=r"pip install 'sdjax\[controlnet\]'"):
        sdjax.controlnet.preprocess("canny", img)


@pytest.mark.parametrize("flags, message", [
    (["--control_image", "c.png"], "--control_image needs a --controlnet"),
    (["--controlnet", "a", "--control_image", "c.png", "--control_image", "d.png"],
     "2 --control_image for 1 --controlnet"),
    (["--controlnet", "a", "--controlnet", "b", "--control_image", "c.png"],
     "2 --controlnet need 2 --control_image"),
    (["--controlnet", "a", "--control_image", "c.png", "--control_start", "0.6",
      "--control_end", "0.5"], "start below end"),
    (["--controlnet", "a:-1"], "must be a finite number >= 0"),
    (["--controlnet", "a", "--control_image", "c.png", "--control_preprocessor", "shuffle",
      "--seed", "-1"], "shuffle needs a --seed >= 0"),
    (["--controlnet", "a", "--control_image", "c.png", "--control_preprocessor", "depth"],
     "invalid choice: 'depth'"),
])
def test_sample_flags_are_checked_before_loading(flags, message, capsys):
    from sdjax.sample import main
    try:
        status = main(["--model", "toy", "--prompt", "x", *flags])
    except SystemExit as e:  # argparse's own errors
        status = e.code
    assert status == 2
    assert message in capsys.readouterr().err


def test_sample_flags_make_the_call_and_the_png_text():
    from sdjax.controlnet import cli
    from sdjax.controlnet.settings import ControlNets
    from sdjax.sample import build_parser
    args = build_parser().parse_args([
        "--controlnet", "nets/control_canny.pth:0.5", "--controlnet", "C:/x/depth",
        "--control_image", "a.png", "--control_image", "b.png", "--control_end", "0.6",
        "--control_preprocessor", "canny", "--control_mode", "prompt"])
    assert args.controlnet == [("nets/control_canny.pth", 0.5), ("C:/x/depth", 1.0)]
    assert cli.call_kwargs(args, ["A", "B"]) == dict(control_image=["A", "B"])
    from sdjax.call_settings import CallSettings, Sampling, Size
    from sdjax.images import parse_parameters
    settings = CallSettings("m", Sampling(2, "euler", 7.0), Size(8, 8),
                            controlnet=ControlNets.from_args(args))
    kwargs = settings.pipeline_kwargs()
    assert {k: kwargs[k] for k in ("controlnet_conditioning_scale", "control_guidance_start",
                                   "control_guidance_end", "guess_mode", "control_mode")} == dict(
        controlnet_conditioning_scale=[0.5, 1.0], control_guidance_start=[0, 0],
        control_guidance_end=[0.6, 1.0], guess_mode=False, control_mode=["prompt"] * 2)
    unit0 = ('Module: canny, Model: control_canny, Weight: 0.5, Resize Mode: Just Resize, '
             'Threshold A: 100, Threshold B: 200, Guidance Start: 0.0, Guidance End: 0.6, '
             'Pixel Perfect: False, Control Mode: My prompt is more important')
    text = settings.parameters("p", "", 1)
    assert f'ControlNet 0: "{unit0}", ControlNet 1: "Module: none, Model: depth,' in text
    assert parse_parameters(text)["ControlNet 0"] == unit0
