"""LoRA and textual inversion against diffusers' load_lora_weights + fuse_lora and
load_textual_inversion on the tiny SD1 model, in float32; and the loads that must fail
leave the pipeline as it was."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sdjax.pipeline import StableDiffusionPipeline
from sdjax.weights.safetensors_io import save_safetensors

TOL = 2e-4   # max abs difference of [0, 1] pixels, as the pipeline's parity tests
SIZE, STEPS = 16, 2
PROMPT = "a red circle on a blue background"
RANK = 4
# diffusers module name -> (in, out, kernel): the tiny SD1 UNet's shapes (tests/tiny_models)
_TB = "down_blocks.0.attentions.0.transformer_blocks.0."
UNET_LAYERS = {_TB + "attn1.to_q": (32, 32, 0), _TB + "attn2.to_k": (32, 32, 0),
               _TB + "attn1.to_out.0": (32, 32, 0), _TB + "ff.net.2": (128, 32, 0),
               "down_blocks.0.attentions.0.proj_in": (32, 32, 1),      # SD1: a 1x1 conv
               "down_blocks.0.resnets.0.conv1": (32, 32, 3),          # LoCon: 3x3 conv
               "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v": (32, 32, 0)}
TE_LAYERS = {"text_model.encoder.layers.0.self_attn.q_proj": (32, 32, 0),
             "text_model.encoder.layers.1.mlp.fc1": (32, 64, 0)}


def _factors(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(net-qualified module name) -> (down, up) in PyTorch layouts."""
    rng = np.random.RandomState(seed)
    out = {}
    for net, layers in (("unet", UNET_LAYERS), ("text_encoder", TE_LAYERS)):
        for name, (n_in, n_out, k) in layers.items():
            down_shape = (RANK, n_in, k, k) if k else (RANK, n_in)
            up_shape = (n_out, RANK, 1, 1) if k else (n_out, RANK)
            out[f"{net}.{name}"] = (rng.randn(*down_shape).astype(np.float32) * 0.3,
                                    rng.randn(*up_shape).astype(np.float32) * 0.3)
    return out


def write_peft_lora(path, seed: int = 0, alpha: float | None = None):
    """diffusers/PEFT layout: unet.<module>.lora_A/lora_B; alpha, if given, in the metadata
    as diffusers' save_lora_weights writes it (else alpha = rank)."""
    tensors = {}
    for name, (down, up) in _factors(seed).items():
        tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = down, up
    # (PEFT matches names by suffix; transformers 5's CLIPTextModel has no text_model. level)
    targets = {"unet": list(UNET_LAYERS),
               "text_encoder": [n.removeprefix("text_model.") for n in TE_LAYERS]}
    config = {f"{net}.{k}": v for net in targets for k, v in
              (("r", RANK), ("lora_alpha", alpha), ("target_modules", targets[net]))}
    save_safetensors(tensors, path, {"format": "pt", "lora_adapter_metadata":
                                     json.dumps(config)} if alpha is not None else None)
    return path


# diffusers' kohya converter leaves a text encoder's self_attn LoRA unapplied (it renames
# it for another CLIP layout), so the files compared with diffusers leave it out;
# test_kohya_and_peft_names_resolve_alike covers it.
DIFFUSERS_MISREADS = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"


# The same layers under CompVis names (kohya's SDXL scripts, and some SD1 trainers, write these).
COMPVIS = {"down_blocks.0.attentions.0.": "input_blocks.1.1.",
           "down_blocks.0.resnets.0.conv1": "input_blocks.1.0.in_layers.2",
           "up_blocks.1.attentions.0.": "output_blocks.2.1."}


def save_kohya(path, factors: dict, alpha: float, prefixes: dict[str, str],
               renames: dict[str, str] | None = None, skip: tuple = ()):
    """kohya/A1111 layout of ``factors`` ({"network.module": (down, up)}): the network's
    prefix + the module name with underscores, lora_down/lora_up and an alpha per module.
    ``renames``: module-name substitutions (CompVis/SGM names); layers whose name contains
    one of ``skip`` are left out."""
    tensors = {}
    for name, (down, up) in factors.items():
        if any(s in name for s in skip):
            continue
        net, _, module = name.partition(".")
        for a, b in (renames or {}).items():
            module = module.replace(a, b)
        key = prefixes[net] + module.replace(".", "_")
        tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
        tensors[f"{key}.alpha"] = np.array(alpha, np.float32)
    save_safetensors(tensors, path)
    return path


def write_kohya_lora(path, seed: int = 1, alpha: float = 2.0, skip: tuple = (),
                     compvis: bool = False):
    """kohya/A1111 layout, renamed as kohya's scripts name diffusers modules."""
    return save_kohya(path, _factors(seed), alpha,
                      {"unet": "lora_unet_", "text_encoder": "lora_te_"},
                      COMPVIS if compvis else None, skip)


@pytest.fixture(scope="module")
def reference(sd1_folder):
    from diffusers import StableDiffusionPipeline as TorchPipeline

    def make():
        return TorchPipeline.from_pretrained(str(sd1_folder), safety_checker=None,
                                             requires_safety_checker=False)
    return make


@pytest.fixture(scope="module")
def ours(sd1_folder):
    return StableDiffusionPipeline.from_pretrained(str(sd1_folder), dtype="float32",
                                                   num_devices=1)


LATENTS = np.random.RandomState(0).randn(1, SIZE // 2, SIZE // 2, 4).astype(np.float32)


def _theirs(pipe, prompt=PROMPT):
    with torch.no_grad():
        return pipe(prompt, latents=torch.from_numpy(LATENTS.transpose(0, 3, 1, 2).copy()),
                    num_inference_steps=STEPS, height=SIZE, width=SIZE,
                    output_type="np").images


def _ours(pipe, prompt=PROMPT):
    return pipe(prompt, num_inference_steps=STEPS, height=SIZE, width=SIZE, latents=LATENTS,
                output_type="float").images


def _flat(pipe) -> dict:
    from flax import nnx
    return {(net, p): np.asarray(v.get_value()) for net, state in pipe.params.items()
            for p, v in nnx.to_flat_state(state)}


def test_lora_matches_diffusers_and_rescales_without_recompiling(ours, reference, tmp_path):
    peft = write_peft_lora(tmp_path / "peft_style.safetensors", alpha=8.0)
    kohya = write_kohya_lora(tmp_path / "kohya_style.safetensors", skip=(DIFFUSERS_MISREADS,))
    pristine = _flat(ours)
    base = _ours(ours)
    compiles = ours.compile_count

    # One comparison with diffusers, of both dialects stacked (each alone: see
    # test_kohya_and_peft_names_resolve_alike); peft is merged at 0.9 first, so the stack also
    # checks that a new scale re-merges from the original weights.
    ours.load_lora(peft, 0.9)
    ours.load_lora(peft, 0.5)
    ours.load_lora(kohya, 0.5)
    ref = reference()
    ref.load_lora_weights(str(peft), adapter_name="peft")
    ref.load_lora_weights(str(kohya), adapter_name="kohya")
    ref.set_adapters(["peft", "kohya"])  # else the last loaded alone is active
    ref.fuse_lora(lora_scale=0.5)
    image = _ours(ours)
    err = np.abs(image - _theirs(ref)).max()
    print(f"peft + kohya LoRA x0.5: max abs pixel error {err:.2e}")
    assert err < TOL
    assert np.abs(image - base).max() > 100 * TOL  # the LoRAs do change the image

    for f in (peft, kohya):
        ours.load_lora(f, 0.0)
    after = _flat(ours)
    assert all(np.array_equal(after[k], v) for k, v in pristine.items())
    assert ours.compile_count == compiles  # every re-merge reused the one executable


def test_kohya_and_peft_names_resolve_alike(ours, tmp_path):
    from sdjax.weights.lora import read_lora

    networks = {net: ours.network(net) for net in ("unet", "text_encoder")}
    peft = read_lora(write_peft_lora(tmp_path / "p.safetensors", seed=5, alpha=1.0), networks)
    kohya = read_lora(write_kohya_lora(tmp_path / "k.safetensors", seed=5, alpha=1.0),
                      networks)
    compvis = read_lora(write_kohya_lora(tmp_path / "c.safetensors", seed=5, alpha=1.0,
                                         compvis=True), networks)
    want = {(la.network, la.path): la.delta() for la in peft.layers}
    assert len(want) == len(UNET_LAYERS) + len(TE_LAYERS)
    for lora in (kohya, compvis):
        got = {(la.network, la.path): la.delta() for la in lora.layers}
        assert got.keys() == want.keys()
        for k, v in want.items():
            np.testing.assert_allclose(got[k], v, rtol=1e-6, err_msg=str(k))


def _addnet_hash(path) -> str:
    """kohya's "addnet" hash as the WebUI computes a LoRA's: the sha256 of what follows the
    safetensors header (written out here, not taken from sdjax)."""
    import hashlib
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()


def test_cli_applies_lora_and_embedding(sd1_folder, tmp_path, capfd, monkeypatch):
    import hashlib

    from PIL import Image

    from sdjax.sample import main

    loaded = []
    real = StableDiffusionPipeline.from_pretrained.__func__

    def keep(cls, *args, **kw):
        loaded.append(real(cls, *args, **kw))
        return loaded[-1]

    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", classmethod(keep))
    lora = write_peft_lora(tmp_path / "style.safetensors")
    save_safetensors({"emb_params": np.ones((2, 32), np.float32)}, tmp_path / "glow.safetensors")
    assert main(["--model", str(sd1_folder), "--prompt", "a glow cat", "--steps", "2",
                 "--num_devices", "1", "--outdir", str(tmp_path / "out"), "--lora",
                 f"{lora}:0.5", "--embedding", str(tmp_path / "glow.safetensors")]) == 0
    err = capfd.readouterr().err
    assert "LoRA style x0.5" in err and "embedding glow" in err
    (made,) = (tmp_path / "out").glob("*.png")
    # The PNG text names them as the WebUI does: a tag in the prompt, the files' hashes.
    text = Image.open(made).text["parameters"]
    emb_hash = hashlib.sha256((tmp_path / "glow.safetensors").read_bytes()).hexdigest()
    assert text.split("\n")[0] == "a glow cat <lora:style:0.5>"
    assert f'Lora hashes: "style: {_addnet_hash(lora)[:12]}"' in text
    assert f'TI hashes: "glow: {emb_hash[:12]}"' in text
    (pipe,) = loaded
    assert {"glow", "glow_1"} <= set(pipe.tokenizer.get_vocab())
    fresh = StableDiffusionPipeline.from_pretrained(str(sd1_folder), dtype="float32",
                                                    num_devices=1)
    merged, pristine = (p.network("unet").down_blocks[0].attentions[0].transformer_blocks[0]
                        .attn1.to_q.kernel.get_value() for p in (pipe, fresh))
    assert np.abs(np.asarray(merged) - np.asarray(pristine)).max() > 1e-3
    # PNG Info makes it again: the tag loads the LoRA from --lora_dir, the embedding is given.
    assert main(["--model", str(sd1_folder), "--num_devices", "1", "--from_png", str(made),
                 "--lora_dir", str(tmp_path), "--embedding", str(tmp_path / "glow.safetensors"),
                 "--outdir", str(tmp_path / "again")]) == 0
    err = capfd.readouterr().err
    assert "not honoured" not in err and "LoRA style x0.5" in err
    (again,) = (tmp_path / "again").glob("*.png")
    assert Image.open(again).text["parameters"] == text
    np.testing.assert_array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(made)))


def test_failed_lora_leaves_the_weights_unchanged(ours, tmp_path):
    good = write_peft_lora(tmp_path / "good.safetensors")
    tensors = dict(np.load(_npz(good)))
    # the last layer does not fit (another model's width): nothing may be merged
    tensors["unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v.lora_A.weight"] = \
        np.zeros((RANK, 48), np.float32)
    save_safetensors(tensors, tmp_path / "bad.safetensors")
    before = _flat(ours)
    with pytest.raises(ValueError, match="do not fit this model's shapes"):
        ours.load_lora(tmp_path / "bad.safetensors")
    after = _flat(ours)
    assert all(np.array_equal(after[k], v) for k, v in before.items())


def _npz(path):
    from sdjax.weights.safetensors_io import SafetensorsFile
    out = path.with_suffix(".npz")
    np.savez(out, **{k: np.asarray(v) for k, v in SafetensorsFile(path).items()})
    return out


def test_textual_inversion_matches_diffusers(sd1_folder, reference, tmp_path):
    rng = np.random.RandomState(3)
    # A1111 .pt (three vectors, named by the file's stem) and a diffusers learned_embeds
    # (one vector, named by its token).
    vectors = torch.from_numpy(rng.randn(3, 32).astype(np.float32) * 0.5)
    torch.save({"string_to_param": {"*": vectors}, "string_to_token": {"*": 265},
                "name": "shiny", "step": 100}, tmp_path / "shiny.pt")
    save_safetensors({"<dotty>": rng.randn(32).astype(np.float32) * 0.5},
                     tmp_path / "learned_embeds.safetensors")
    prompt = "a shiny circle, <dotty> style"

    pipe = StableDiffusionPipeline.from_pretrained(str(sd1_folder), dtype="float32",
                                                   num_devices=1)
    words = len(pipe.tokenizer)
    assert pipe.load_textual_inversion(tmp_path / "shiny.pt") == "shiny"
    assert pipe.load_textual_inversion(tmp_path / "learned_embeds.safetensors") == "<dotty>"
    assert len(pipe.tokenizer) == words + 4

    ref = reference()
    ref.load_textual_inversion(str(tmp_path / "shiny.pt"), token="shiny")
    ref.load_textual_inversion(str(tmp_path / "learned_embeds.safetensors"))
    err = np.abs(_ours(pipe, prompt) - _theirs(ref, prompt)).max()
    print(f"textual inversion: max abs pixel error {err:.2e}")
    assert err < TOL

    # Saved as a diffusers folder, the tokens and the grown table travel together.
    from transformers import CLIPTextModel, CLIPTokenizer
    pipe.save_pretrained(tmp_path / "saved")
    saved_tok = CLIPTokenizer.from_pretrained(str(tmp_path / "saved" / "tokenizer"))
    saved_te = CLIPTextModel.from_pretrained(str(tmp_path / "saved" / "text_encoder"))
    assert saved_tok.convert_tokens_to_ids("shiny_2") == len(saved_tok) - 2
    assert saved_te.get_input_embeddings().weight.shape[0] == len(saved_tok)
    with pytest.raises(ValueError, match="cannot be saved in a single file"):
        pipe.save_single_file(tmp_path / "single.safetensors")

    # Refusals leave the tokenizer and the token table as they were.
    table = _flat(pipe)
    save_safetensors({"emb_params": np.zeros((1, 48), np.float32)}, tmp_path / "wide.safetensors")
    save_safetensors({"emb_params": np.zeros((1, 32), np.float32)}, tmp_path / "cat.safetensors")
    with pytest.raises(ValueError, match="vectors of width 48"):
        pipe.load_textual_inversion(tmp_path / "wide.safetensors")
    with pytest.raises(ValueError, match="already a word"):
        pipe.load_textual_inversion(tmp_path / "cat.safetensors")
    with pytest.raises(ValueError, match="already a word"):
        pipe.load_textual_inversion(tmp_path / "learned_embeds.safetensors")
    assert len(pipe.tokenizer) == words + 4
    after = _flat(pipe)
    assert all(np.array_equal(after[k], v) for k, v in table.items())
