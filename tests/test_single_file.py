"""Single-file checkpoints (CompVis/A1111 layout): the layout is the one diffusers' own
``from_single_file`` loads, ``.ckpt`` files give the same parameters through the safe
unpickler, the family is detected from the real full-size key sets, VAE swaps, conversion."""

import dataclasses
import json

import jax
import numpy as np
import pytest
import torch

from sdjax import convert
from sdjax.pipeline import StableDiffusionPipeline
from sdjax.weights.clip_bpe import bundled_clip_tokenizer
from sdjax.weights.compvis_names import (
    OPENCLIP_PREFIX,
    clip_from_compvis,
    clip_to_compvis,
    openclip_from_compvis,
    unet_from_compvis,
    unet_to_compvis,
    vae_from_compvis,
    vae_to_compvis,
)
from sdjax.weights.diffusers_folder import NETWORKS, _ShapeOnlyRngs
from sdjax.weights.errors import WeightsError
from sdjax.weights.families import PRESETS, detect
from sdjax.weights.files import open_tensor_file
from sdjax.weights.loader import map_keys
from sdjax.weights.safetensors_io import SafetensorsFile
from sdjax.weights.single_file import load_single_file, load_vae

SIZE, STEPS = 64, 2  # the full block structure needs 8x8 latents


def _params(x):
    """The parameter arrays of a module or of a pipeline's parameter state, in path order."""
    from flax import nnx
    if isinstance(x, nnx.Module):
        x = nnx.state(x, nnx.Param)
    return jax.tree.leaves(x)


def _same_params(a, b) -> bool:
    pa, pb = _params(a), _params(b)
    return len(pa) == len(pb) and all(np.array_equal(x, y) for x, y in zip(pa, pb, strict=True))


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_diffusers_loads_our_single_file_as_the_folder(single_files, kind):
    """diffusers' own single-file loader reads what we write into exactly the folder's
    networks (the same state dicts, so the same images): the layout is the real one."""
    from diffusers import StableDiffusionPipeline as TorchPipeline
    folder, file = single_files[kind]
    opts = dict(safety_checker=None, requires_safety_checker=False)
    ref = TorchPipeline.from_pretrained(str(folder), **opts)
    from_file = TorchPipeline.from_single_file(str(file), config=str(folder),
                                               local_files_only=True, **opts)
    for net in ("unet", "vae", "text_encoder"):
        a, b = getattr(ref, net).state_dict(), getattr(from_file, net).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), net
    assert from_file.scheduler.config.prediction_type == ref.scheduler.config.prediction_type

    ours = StableDiffusionPipeline.from_pretrained(str(file), config=str(folder),
                                                   dtype="float32", num_devices=1)
    # Identical parameters: the single file and the folder give the same images bit for bit.
    for net in ("unet", "vae", "text_encoder"):
        assert _same_params(ours.params[net], single_files.params[kind][net]), net


def test_single_file_images_match_diffusers(single_files):
    from diffusers import StableDiffusionPipeline as TorchPipeline
    folder, file = single_files["sd1"]
    ref = TorchPipeline.from_single_file(str(file), config=str(folder), local_files_only=True,
                                         safety_checker=None, requires_safety_checker=False)
    latents = np.random.RandomState(0).randn(1, SIZE // 8, SIZE // 8, 4).astype(np.float32)
    with torch.no_grad():
        expected = ref("a red circle", negative_prompt="blue", height=SIZE, width=SIZE,
                       latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()),
                       num_inference_steps=STEPS, output_type="np").images
    ours = StableDiffusionPipeline.from_pretrained(str(file), config=str(folder),
                                                   dtype="float32", num_devices=1)
    out = ours("a red circle", negative_prompt="blue", latents=latents, height=SIZE,
               width=SIZE, num_inference_steps=STEPS, output_type="float").images
    err = np.abs(out - expected).max()
    print(f"single file vs diffusers: max pixel error {err:.2e}")
    assert err <= 2e-4


def test_ckpt_identical_parameters_ema_choice_and_yaml(single_files, tmp_path):
    folder, file = single_files["sd1"]
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in SafetensorsFile(file).items()}
    # A training checkpoint: trained and EMA UNet weights (LitEma drops the dots), buffers.
    ema = {"model_ema." + k.split(".", 1)[1].replace(".", ""): v + 1.0
           for k, v in tensors.items() if k.startswith("model.diffusion_model.")}
    extra = {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7),
             "alphas_cumprod": torch.linspace(1, 0, 1000)}
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {**tensors, **ema, **extra}, "global_step": 10}, ckpt)

    # The original LDM config beside the file sets the prediction type, as in the WebUI.
    (tmp_path / "model.yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n")

    trained = load_single_file(ckpt, config=folder)
    for net in ("unet", "vae", "text_encoder"):
        assert _same_params(getattr(trained, net), single_files.params["sd1"][net]), net
    assert "not the EMA copy" in trained.note and "--ema" in trained.note
    assert trained.scheduler_config["prediction_type"] == "v_prediction"
    assert ".yaml" in trained.note and "--prediction_type" in trained.note
    chosen = load_single_file(ckpt, config=folder, ema=True, prediction_type="epsilon")
    assert chosen.scheduler_config["prediction_type"] == "epsilon"
    got = np.asarray(chosen.unet.conv_in.bias[...])
    np.testing.assert_array_equal(got, tensors["model.diffusion_model.input_blocks.0.0.bias"]
                                  .numpy() + 1.0)
    assert "EMA copy" in chosen.note
    with pytest.raises(WeightsError, match="one set of UNet weights"):
        load_single_file(file, config=folder, ema=True)


# ------------------------------------------------------------------ the real key sets

def _zeros(shape):
    """Shape without memory: every element is the same zero."""
    return np.broadcast_to(np.zeros((), np.float32), shape)


def _openclip_keys() -> dict:
    """OpenCLIP ViT-H/14's text tower as SD 2.x files hold it: 24 layers, fused in_proj."""
    d, p = 1024, OPENCLIP_PREFIX
    out = {p + "token_embedding.weight": (49408, d), p + "positional_embedding": (77, d),
           p + "ln_final.weight": (d,), p + "ln_final.bias": (d,),
           p + "text_projection": (d, d), p + "logit_scale": ()}
    for i in range(24):
        b = f"{p}transformer.resblocks.{i}."
        out.update({b + "ln_1.weight": (d,), b + "ln_1.bias": (d,), b + "ln_2.weight": (d,),
                    b + "ln_2.bias": (d,), b + "attn.in_proj_weight": (3 * d, d),
                    b + "attn.in_proj_bias": (3 * d,), b + "attn.out_proj.weight": (d, d),
                    b + "attn.out_proj.bias": (d,), b + "mlp.c_fc.weight": (4 * d, d),
                    b + "mlp.c_fc.bias": (4 * d,), b + "mlp.c_proj.weight": (d, 4 * d),
                    b + "mlp.c_proj.bias": (d,)})
    return out


def _full_size_key_set(family) -> dict[str, tuple]:
    """name -> shape of a full-size single file of ``family``: diffusers modules built on
    the meta device (real names and shapes, no memory), renamed to the CompVis layout, plus
    the buffers real files carry."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    def shapes(module):
        return {k: _zeros(tuple(v.shape)) for k, v in module.state_dict().items()}

    with torch.device("meta"):
        unet = UNet2DConditionModel(**{k: v for k, v in vars(family.unet).items()
                                       if v is not None})
        vae = AutoencoderKL(**{k: v for k, v in vars(family.vae).items() if v is not None})
        te = None if family.openclip else CLIPTextModel(
            CLIPTextConfig(**dataclasses.asdict(family.text_encoder)))
    keys = {**unet_to_compvis(shapes(unet), family.unet),
            **vae_to_compvis(shapes(vae), family.vae)}
    keys = {k: tuple(v.shape) for k, v in keys.items()}
    if family.openclip:
        keys.update(_openclip_keys())
    else:
        keys.update({k: tuple(v.shape) for k, v in clip_to_compvis(shapes(te)).items()})
        keys["cond_stage_model.transformer.text_model.embeddings.position_ids"] = (1, 77)
    keys.update({"alphas_cumprod": (1000,), "betas": (1000,), "model_ema.decay": (),
                 "model_ema.num_updates": ()})
    return keys


def _header_only_safetensors(path, keys: dict[str, tuple]) -> None:
    """A valid safetensors file of these shapes whose data is a hole (sparse on disk)."""
    header, offset = {}, 0
    for name, shape in sorted(keys.items()):
        n = int(np.prod(shape, dtype=np.int64)) * 2
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        f.truncate(8 + len(blob) + offset)


@pytest.mark.parametrize("name,diffusers_type,dry_load", [
    ("sd15", "v1", True), ("sd21-v", "v2", True), ("sd15-inpainting", "inpainting", False),
    ("sd2-inpainting", "inpainting_v2", False)])
def test_family_detection_on_full_size_key_sets(tmp_path, name, diffusers_type, dry_load):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    family = PRESETS[name]
    keys = _full_size_key_set(family)
    # diffusers' own detector reads the same set as the same family: the names are real.
    assert infer_diffusers_model_type({k: torch.empty(s, device="meta")
                                       for k, s in keys.items()}) == diffusers_type
    path = tmp_path / "model.safetensors"
    _header_only_safetensors(path, keys)
    tensors = SafetensorsFile(path)
    assert detect(tensors).name == name
    if not dry_load:  # the inpainting sets differ from the base ones in conv_in only
        return
    # Every tensor maps onto the family's networks with the right shape (no data read).
    views = {"unet": unet_from_compvis(tensors, family.unet),
             "vae": vae_from_compvis(tensors, family.vae),
             "text_encoder": openclip_from_compvis(tensors, family.text_encoder)
             if family.openclip else clip_from_compvis(tensors)}
    from flax import nnx
    for net, view in views.items():
        kind = NETWORKS[net]
        cfg = {"unet": family.unet, "vae": family.vae, "text_encoder": family.text_encoder}[net]
        abstract = nnx.eval_shape(lambda kind=kind, cfg=cfg: kind.model(cfg, rngs=_ShapeOnlyRngs()))
        want = {".".join(map(str, p)): tuple(v.shape)
                for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
        got = {tgt: tuple(tf(_zeros(view.shape(key))).shape)
               for key, (tgt, tf) in map_keys(list(view), kind.rules).items() if tgt}
        assert got == want, net


def test_family_detection_from_ckpt_metadata(tmp_path):
    keys = _full_size_key_set(PRESETS["sd15"])
    one = torch.zeros(1)
    # Every tensor a zero-stride view of one element: torch.save writes 4 bytes of data.
    state = {k: one.expand(*s) if s else one[0] for k, s in keys.items()}
    path = tmp_path / "v1-5.ckpt"
    torch.save({"state_dict": state, "global_step": 840000}, path)
    assert path.stat().st_size < 10_000_000
    tensors = open_tensor_file(path)
    assert detect(tensors).name == "sd15"
    assert tensors.extras["global_step"] == 840000


# ------------------------------------------------------------------ what sdjax ships

def test_bundled_tokenizer_is_clips():
    tok = bundled_clip_tokenizer()
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    for text in ["an astronaut riding a horse, 4k, trending on artstation",
                 "café déjà vu: (emphasis:1.2) [less] 日本語 🐱"]:
        ids = tok(text).input_ids
        assert ids[0] == 49406 and ids[-1] == 49407 and max(ids[1:-1]) < 49406
        assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == \
            text.lower().replace(" ", "")
    sd2 = bundled_clip_tokenizer("!")
    assert sd2.pad_token_id == 0
    assert sd2("a cat", padding="max_length", max_length=6).input_ids == \
        [49406, 320, 2368, 49407, 0, 0]


# ------------------------------------------------------------------ VAE swap, conversion

def test_vae_swap_from_file_and_folder(single_files, tmp_path):
    from safetensors.numpy import save_file
    _, file_sd1 = single_files["sd1"]
    folder_sd2, _ = single_files["sd2"]
    expected = load_vae(folder_sd2 / "vae", None)
    cfg = expected.config
    full = SafetensorsFile(single_files["sd2"][1])
    vae_keys = {k: np.array(full[k]) for k in full if k.startswith("first_stage_model.")}
    save_file(vae_keys, str(tmp_path / "prefixed.safetensors"))
    save_file({k.split(".", 1)[1]: v for k, v in vae_keys.items()},
              str(tmp_path / "vae-ft.safetensors"))
    for path in ("prefixed.safetensors", "vae-ft.safetensors"):
        assert _same_params(load_vae(tmp_path / path, cfg), expected), path
    with pytest.raises(WeightsError, match="a full model, not a VAE"):
        load_vae(file_sd1, cfg)


def test_convert_cli_both_ways(single_files, tmp_path, capsys):
    folder, file = single_files["sd1"]
    half = tmp_path / "half.safetensors"
    assert convert.main([str(folder), str(half), "--half"]) == 0
    assert {e.dtype for e in [SafetensorsFile(half)[k] for k in SafetensorsFile(half)]} == \
        {np.dtype(np.float16)}
    back = tmp_path / "back"
    assert convert.main([str(file), str(back), "--config", str(folder)]) == 0
    for net in ("unet", "vae"):  # the same tensors as the folder the file was made from
        name = f"{net}/diffusion_pytorch_model.safetensors"
        a, b = SafetensorsFile(back / name), SafetensorsFile(folder / name)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), net
    assert (back / "tokenizer").is_dir() and (back / "model_index.json").is_file()
    capsys.readouterr()
    before = half.read_bytes()
    assert convert.main([str(folder), str(half)]) == 2
    err = capsys.readouterr().err
    assert "exists" in err and "--overwrite" in err and half.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_convert_usage_errors_are_one_line(capsys):
    """A wrong command line is one ``error:`` line and exit 2, like every other bad input (not
    argparse's usage block)."""
    for argv, message in ((["only-src.safetensors"], "dst"), (["a", "b", "--bogus"], "--bogus")):
        with pytest.raises(SystemExit) as exit_info:
            convert.main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_toy_round_trip_through_a_single_file_needs_no_flags(tmp_path):
    """toy -> single file -> folder with no flags: the file carries its configs, tokenizer
    and sdjax.json defaults (weights.file_configs), so all three make the same image with the
    model's own defaults (issue 28: up to 203/255 apart, the guidance interval lost)."""
    import os
    file, back = tmp_path / "toy.safetensors", tmp_path / "back"
    assert convert.main(["toy", str(file)]) == 0 and convert.main([str(file), str(back)]) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert back.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    toy = StableDiffusionPipeline.from_pretrained("toy", dtype="float32", num_devices=1)
    pipes = [toy] + [StableDiffusionPipeline.from_pretrained(str(source), dtype="float32",
                                                             num_devices=1)
                     for source in (file, back)]
    for pipe in pipes[1:]:  # everything that decides an image is the toy's
        assert pipe.model_defaults == toy.model_defaults and pipe.model_defaults
        assert pipe.default_hw == toy.default_hw and pipe.scheduler_config == toy.scheduler_config
        assert pipe.tokenizer.get_vocab() == toy.tokenizer.get_vocab()
        assert jax.tree.all(jax.tree.map(np.array_equal, pipe.params, toy.params))
    # and the end of the round trip makes the toy's image (one compile each)
    images = [p("a red circle", seed=3, num_inference_steps=1, height=16, width=16).images
              for p in (toy, pipes[2])]
    np.testing.assert_array_equal(images[0], images[1])
    # --config toy names the toy's configs too
    assert StableDiffusionPipeline.from_pretrained(
        str(file), config="toy", dtype="float32", num_devices=1).default_hw == toy.default_hw
