"""SDXL single files (Stability's SGM layout, as ``sd_xl_base_1.0.safetensors`` and
``sd_xl_refiner_1.0.safetensors``) and saving SDXL pipelines, on the tiny SDXL base and refiner.

diffusers is the oracle for the layouts: its ``from_single_file`` must read our files, and its
``from_pretrained`` our folders, as the weights they came from."""

import dataclasses
import json

import jax
import numpy as np
import pytest
import torch

import sdjax
from sdjax import convert
from sdjax.dispatch import pipeline_class
from sdjax.weights.errors import WeightsError
from sdjax.weights.families import PRESETS, detect
from sdjax.weights.files import open_tensor_file
from sdjax.weights.safetensors_io import save_safetensors

XL = sdjax.StableDiffusionXLPipeline


def _load(model, **kwargs):
    return XL.from_pretrained(str(model), dtype="float32", num_devices=1, **kwargs)


def _assert_same_params(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _assert_same_state_dicts(ref, other):
    """Every network of two diffusers pipelines holds the same tensors."""
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(ref, name), getattr(other, name)
        assert (a is None) == (b is None), name
        if a is None:
            continue
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys(), (name, sorted(set(sa) ^ set(sb))[:5])
        bad = [k for k in sa if not torch.equal(sa[k], sb[k])]
        assert not bad, (name, bad[:5])


@pytest.fixture(scope="module")
def xl(sdxl_folder, sdxl_refiner_folder, tmp_path_factory):
    """{"base"/"refiner": (folder, our pipeline from it, our single file of it)}."""
    root = tmp_path_factory.mktemp("sdxl-single")
    out = {}
    for kind, folder in (("base", sdxl_folder), ("refiner", sdxl_refiner_folder)):
        pipe = _load(folder)
        out[kind] = (folder, pipe, pipe.save_single_file(root / f"{kind}.safetensors"))
    return out


def _tensors(path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in open_tensor_file(path).items()}


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_our_file_is_the_sgm_layout_diffusers_reads(xl, kind):
    """Folder -> our single file: diffusers' from_single_file (configs from the folder, no
    download) reads the folder's weights from it, and so do we, bit for bit."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    folder, pipe, path = xl[kind]
    keys = set(open_tensor_file(path))
    prefixes = {"base": ("conditioner.embedders.0.transformer.text_model.",
                         "conditioner.embedders.1.model."),
                "refiner": ("conditioner.embedders.0.model.",)}[kind]
    assert all(any(k.startswith(p) for k in keys) for p in prefixes)
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    torch_cls = StableDiffusionXLPipeline if kind == "base" else StableDiffusionXLImg2ImgPipeline
    _assert_same_state_dicts(torch_cls.from_pretrained(str(folder)),
                             torch_cls.from_single_file(str(path), config=str(folder),
                                                        local_files_only=True))

    assert pipeline_class(str(path)) is XL
    ours = _load(path, config=folder)
    assert f"SDXL {kind}" in ours.note and ours.is_refiner == (kind == "refiner")
    _assert_same_params(ours.params, pipe.params)
    assert (ours.force_zeros_for_empty_prompt, ours.requires_aesthetics_score) == \
        (pipe.force_zeros_for_empty_prompt, pipe.requires_aesthetics_score)


def test_what_released_files_carry_besides_loads(xl, tmp_path):
    """The buffers and unused heads the released SGM files hold (OpenCLIP's logit_scale,
    CLIP's position_ids, the denoiser's sigmas) are read past, as diffusers' conversion does."""
    folder, pipe, path = xl["base"]
    tensors = _tensors(path)
    tensors.update({"conditioner.embedders.1.model.logit_scale": np.ones((), np.float32),
                    "conditioner.embedders.0.transformer.text_model.embeddings.position_ids":
                        np.arange(77, dtype=np.int64)[None],
                    "denoiser.sigmas": np.linspace(0.03, 14.6, 1000, dtype=np.float32)})
    save_safetensors(tensors, tmp_path / "released.safetensors")
    _assert_same_params(_load(tmp_path / "released.safetensors", config=folder).params,
                        pipe.params)


class _Header(dict):
    """Tensor name -> shape, answering as a file's header does (no data)."""
    path = "sd_xl.safetensors"

    def shape(self, key):
        return self[key]


def test_base_and_refiner_are_told_apart(xl, sd1_folder, tmp_path):
    unet = "model.diffusion_model."
    base = _Header({unet + "input_blocks.0.0.weight": (320, 4, 3, 3),
                    unet + "label_emb.0.0.weight": (1280, 2816),
                    "conditioner.embedders.0.transformer.text_model.embeddings."
                    "position_embedding.weight": (77, 768),
                    "conditioner.embedders.1.model.positional_embedding": (77, 1280)})
    refiner = _Header({unet + "input_blocks.0.0.weight": (384, 4, 3, 3),
                       unet + "label_emb.0.0.weight": (1536, 2560),
                       "conditioner.embedders.0.model.positional_embedding": (77, 1280)})
    assert detect(base) is PRESETS["sdxl"] and detect(refiner) is PRESETS["sdxl-refiner"]
    # What such a file lacks comes from the presets: the bundled vocabulary padded as SDXL's
    # tokenizers pad, stable-diffusion-xl-base-1.0's scheduler, the repositories' options.
    from sdjax.weights.single_file import _complete
    done = _complete(None, base, None, None)
    assert sorted(done.configs) == ["text_encoder", "text_encoder_2", "unet", "vae"]
    assert (done.tokenizer.pad_token, done.extra["tokenizer_2"].pad_token) == ("<|endoftext|>", "!")
    assert done.scheduler_config["_class_name"] == "EulerDiscreteScheduler"
    assert done.extra["force_zeros_for_empty_prompt"] and \
        not done.extra["requires_aesthetics_score"]
    done = _complete(None, refiner, None, None)
    assert sorted(done.configs) == ["text_encoder_2", "unet", "vae"]
    assert done.tokenizer.pad_token == "!" and done.extra == {
        "force_zeros_for_empty_prompt": False, "requires_aesthetics_score": True}

    folder, _, path = xl["base"]
    # Tiny shapes are no SDXL 1.0: a file without sdjax's metadata (as another tool writes
    # it) needs config=, and the message says what to pass.
    save_safetensors(_tensors(path), tmp_path / "bare.safetensors")
    with pytest.raises(WeightsError, match="SDXL base checkpoint whose shapes.*config="):
        _load(tmp_path / "bare.safetensors")
    with pytest.raises(WeightsError, match="sdxl-refiner is for SDXL refiner models; the file "
                                           "is an SDXL base"):
        _load(path, config="sdxl-refiner")
    with pytest.raises(WeightsError, match="is not an SDXL folder"):
        _load(path, config=sd1_folder)
    with pytest.raises(WeightsError, match="SDXL refiner folder, the file an SDXL base"):
        _load(path, config=xl["refiner"][0])


def test_a_missing_or_renamed_tensor_is_named(xl, tmp_path):
    folder, _, path = xl["base"]
    tensors = _tensors(path)
    missing = dict(tensors)
    del missing["model.diffusion_model.label_emb.0.2.weight"]
    save_safetensors(missing, tmp_path / "missing.safetensors")
    with pytest.raises(WeightsError, match=r"missing from the weights.*add_embedding\.linear_2"):
        _load(tmp_path / "missing.safetensors", config=folder)
    # (UNet keys are named without their model.diffusion_model. prefix)
    for old, new, named in (
            ("conditioner.embedders.1.model.transformer.resblocks.0.ln_1.weight",
             "conditioner.embedders.1.model.transformer.resblocks.0.ln_9.weight",
             r"conditioner\.embedders\.1\.model\.transformer\.resblocks\.0\.ln_9\.weight"),
            ("model.diffusion_model.label_emb.0.0.bias", "model.diffusion_model.label_emb.0.1.bias",
             r"UNet: 1 keys .*: label_emb\.0\.1\.bias")):
        renamed = dict(tensors)
        renamed[new] = renamed.pop(old)
        save_safetensors(renamed, tmp_path / "renamed.safetensors")
        with pytest.raises(WeightsError, match=named):
            _load(tmp_path / "renamed.safetensors", config=folder)


def test_the_wrong_pipeline_says_which(xl, tmp_path):
    with pytest.raises(WeightsError, match="SDXL base checkpoint: load it with "
                                           "sdjax.StableDiffusionXLPipeline"):
        sdjax.StableDiffusionPipeline.from_pretrained(str(xl["base"][2]), num_devices=1)
    sd = tmp_path / "sd15.safetensors"
    save_safetensors({"model.diffusion_model.input_blocks.0.0.weight":
                      np.zeros((8, 4, 3, 3), np.float32),
                      "cond_stage_model.transformer.text_model.final_layer_norm.weight":
                      np.zeros(8, np.float32)}, sd)
    assert pipeline_class(str(sd)) is sdjax.StableDiffusionPipeline
    with pytest.raises(WeightsError, match="not an SDXL checkpoint.*StableDiffusionPipeline"):
        XL.from_pretrained(str(sd), num_devices=1)


def test_one_image_from_the_file_is_the_folders(xl):
    """Weights, tokenizers, scheduler and options from file + config= make the folder's image.
    One compile: the folder's pipeline runs the executable the file's compiled (same networks,
    so the same program; the tokens, params and time ids are its own runtime inputs)."""
    folder, pipe, path = xl["base"]
    from_file = _load(path, config=folder)
    kwargs = dict(num_inference_steps=2, height=16, width=16, seed=3, output_type="float",
                  scheduler="euler")
    image = from_file("a red circle", **kwargs).images
    pipe._compiled = from_file._compiled
    np.testing.assert_array_equal(pipe("a red circle", **kwargs).images, image)
    assert from_file.compile_count == 1 and pipe.compile_count == 1


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_save_pretrained_is_a_diffusers_folder(xl, kind, tmp_path):
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    folder, pipe, _ = xl[kind]
    pipe.model_defaults = {"num_inference_steps": 30}
    saved = pipe.save_pretrained(tmp_path / "saved")
    pipe.model_defaults = {}
    index = json.loads((saved / "model_index.json").read_text())
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    if kind == "refiner":
        assert index["text_encoder"] == index["tokenizer"] == [None, None]
        assert index["requires_aesthetics_score"] is True
        assert not (saved / "text_encoder").exists()
    assert index["force_zeros_for_empty_prompt"] == (kind == "base")
    assert json.loads((saved / "sdjax.json").read_text()) == {"num_inference_steps": 30}
    torch_cls = StableDiffusionXLPipeline if kind == "base" else StableDiffusionXLImg2ImgPipeline
    _assert_same_state_dicts(torch_cls.from_pretrained(str(folder)),
                             torch_cls.from_pretrained(str(saved)))
    again = _load(saved)
    _assert_same_params(again.params, pipe.params)
    assert again.tokenizer_2 is None if kind == "refiner" else again.tokenizer_2.pad_token == "!"


def _assert_same_model(a, b):
    """Everything that decides an image: weights, tokenizers, scheduler, options, defaults."""
    _assert_same_params(a.params, b.params)
    assert a.scheduler_config == b.scheduler_config and a.model_defaults == b.model_defaults
    assert (a.force_zeros_for_empty_prompt, a.requires_aesthetics_score, a.default_hw) == (
        b.force_zeros_for_empty_prompt, b.requires_aesthetics_score, b.default_hw)
    for name in ("tokenizer", "tokenizer_2"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert (x.get_vocab(), x.pad_token) == (y.get_vocab(), y.pad_token), name


def test_convert_both_ways(xl, tmp_path):
    """python -m sdjax.convert picks the SDXL pipeline from SRC, either way; the file sdjax
    writes carries its configs, tokenizers, options and sdjax.json defaults (issue 28), so
    it loads, and converts back, with no flags, as the model it was made from."""
    folder, pipe, path = xl["base"]
    (tmp_path / "src").mkdir()
    for item in folder.iterdir():  # the folder with an sdjax.json
        (tmp_path / "src" / item.name).symlink_to(item)
    defaults = {"num_inference_steps": 3, "guidance_scale": 4.5, "guidance_interval": [0.5, 9]}
    (tmp_path / "src" / "sdjax.json").write_text(json.dumps(defaults))
    assert convert.main([str(tmp_path / "src"), str(tmp_path / "xl.safetensors")]) == 0
    ours = _tensors(path)
    written = _tensors(tmp_path / "xl.safetensors")
    assert written.keys() == ours.keys()
    assert all(np.array_equal(written[k], ours[k]) for k in ours)
    # back to a folder with no --config: the same model (its sdjax.json too)
    assert convert.main([str(tmp_path / "xl.safetensors"), str(tmp_path / "back")]) == 0
    assert json.loads((tmp_path / "back" / "model_index.json").read_text())["_class_name"] == \
        "StableDiffusionXLPipeline"
    assert json.loads((tmp_path / "back" / "sdjax.json").read_text()) == defaults
    for part in ("unet/diffusion_pytorch_model", "text_encoder_2/model"):
        a, b = (_tensors(f / f"{part}.safetensors") for f in (folder, tmp_path / "back"))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    def settings(path):  # a folder's JSON, less the writer's version
        return {k: v for k, v in json.loads(path.read_text()).items()
                if k != "_diffusers_version"}

    for name in ("model_index.json", "scheduler/scheduler_config.json",
                 "tokenizer/tokenizer.json", "tokenizer_2/tokenizer.json"):
        assert settings(tmp_path / "back" / name) == settings(folder / name), name
    pipe.model_defaults = {**defaults, "guidance_interval": (0.5, 9.0)}
    try:
        _assert_same_model(_load(tmp_path / "xl.safetensors"), pipe)
    finally:
        pipe.model_defaults = {}
    # the refiner's file too (one encoder, the aesthetic score): what its metadata completes
    from sdjax.weights.single_file import _complete
    _, refiner, refiner_file = xl["refiner"]
    done = _complete(None, open_tensor_file(refiner_file), None, None)
    assert sorted(done.configs) == ["text_encoder_2", "unet", "vae"]
    assert done.configs["unet"] == refiner.unet_config
    assert done.configs["text_encoder_2"] == refiner.text_encoder_config
    assert done.extra == {"force_zeros_for_empty_prompt": False,
                          "requires_aesthetics_score": True}
    assert done.tokenizer.get_vocab() == refiner.tokenizer.get_vocab()
    assert done.scheduler_config == refiner.scheduler_config


def _distinct(shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Small arrays of those shapes whose values tell every tensor and row apart."""
    out, start = {}, 0
    for key, shape in shapes.items():
        size = int(np.prod(shape))
        out[key] = np.arange(start, start + size, dtype=np.float32).reshape(shape)
        start += size
    return out


@pytest.mark.parametrize("kind", ["sdxl", "sdxl-refiner"])
def test_we_read_a_full_size_file_as_diffusers_conversion_does(kind):
    """At SDXL 1.0's real structure (UNet depth 10, two resnets per level, the 32-layer bigG),
    a file with every tensor holding distinct values: each of our renamed tensors is the one
    diffusers' single-file conversion puts under that name (no weights: one value per
    tensor, and one per row where q/k/v are fused)."""
    from diffusers.loaders import single_file_utils as dsf
    from flax import nnx

    from sdjax.models.clip_text import CLIPTextModelWithProjection
    from sdjax.models.unet import UNet2DConditionModel
    from sdjax.weights import compvis_names as cn
    from sdjax.weights.diffusers_folder import _ShapeOnlyRngs
    from sdjax.weights.export import parameter_keys

    family = PRESETS[kind]
    unet = nnx.eval_shape(lambda: UNet2DConditionModel(family.unet, rngs=_ShapeOnlyRngs()))
    names = cn.rename_keys([k for k, _ in parameter_keys(unet).values()],
                           cn.unet_blocks(family.unet), forward=False)
    sgm = {cn.UNET_PREFIX + v: (1,) for v in names.values()}
    bigg = family.text_encoder_2 or family.text_encoder
    te = nnx.eval_shape(lambda: CLIPTextModelWithProjection(bigg, rngs=_ShapeOnlyRngs()))
    # A row per hidden unit where q/k/v are fused (diffusers splits them by text_projection's
    # first dimension, the hidden size), one value elsewhere.
    h = bigg.hidden_size
    te_keys = {key: (h, 1) if key.endswith("_proj.weight") else (h,) if key.endswith(
        "_proj.bias") else (1, h) if key == "text_projection.weight" else (1,)
        for key, _ in parameter_keys(te).values()}
    refiner = kind == "sdxl-refiner"
    prefix = cn.REFINER_OPENCLIP_PREFIX if refiner else cn.SDXL_OPENCLIP_PREFIX
    sgm.update({k: v.shape for k, v in cn.openclip_to_compvis(
        {k: np.zeros(s, np.float32) for k, s in te_keys.items()}, prefix).items()})
    tensors = _distinct(sgm)
    torch_tensors = {k: torch.from_numpy(v) for k, v in tensors.items()}

    theirs = dsf.convert_ldm_unet_checkpoint(torch_tensors, dataclasses.asdict(family.unet))
    ours = cn.unet_from_compvis(tensors, family.unet)
    assert set(ours) == set(theirs) and len(ours) == len(names)
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key].numpy(), err_msg=key)

    theirs = dsf.convert_open_clip_checkpoint(None, torch_tensors, prefix=prefix)
    ours = cn.openclip_from_compvis(tensors, bigg, prefix, projection=True)
    assert set(ours) == set(theirs) == {k if k.startswith("text_projection") else
                                        "text_model." + k.removeprefix("text_model.")
                                        for k in te_keys}
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key].numpy(), err_msg=key)
