"""LoRA and textual inversion on SDXL (both text encoders, the SDXL UNet) against diffusers'
load_lora_weights + fuse_lora and load_textual_inversion on the tiny SDXL model, in float32;
the file dialects real SDXL LoRAs use resolve alike; unloads and refusals leave the weights
bit for bit as they were."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flax import nnx

import sdjax
from sdjax.weights.safetensors_io import save_safetensors
from tests.test_adapters import save_kohya
from tests.tiny_models import diffusers_scheduler

TOL = 2e-4   # max abs difference of [0, 1] pixels, as the pipeline's parity tests
SIZE, STEPS = 16, 2
RANK = 4
# diffusers module names of the tiny SDXL (tests/tiny_models.py) that LoRAs touch: attention
# and linear proj_in/proj_out (kohya's defaults), a 3x3 conv and a time_emb_proj (LoCon and
# LCM-LoRA also train resnets).
UNET = ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
        "down_blocks.1.attentions.0.proj_in",
        "down_blocks.2.attentions.0.transformer_blocks.1.ff.net.2",
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0",
        "up_blocks.0.attentions.1.proj_out",
        "down_blocks.0.resnets.0.conv1",
        "up_blocks.1.resnets.0.time_emb_proj"]
TE = ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.mlp.fc1"]
TE2 = ["text_model.encoder.layers.0.self_attn.v_proj", "text_model.encoder.layers.2.mlp.fc2"]
# The same modules as kohya's sd-scripts names SDXL's UNet (the original SGM layout, one
# resnet per level here: layers_per_block=1).
SGM = {"down_blocks.1.attentions.0.": "input_blocks.3.1.",
       "down_blocks.2.attentions.0.": "input_blocks.5.1.",
       "mid_block.attentions.0.": "middle_block.1.",
       "up_blocks.0.attentions.1.": "output_blocks.1.1.",
       "down_blocks.0.resnets.0.conv1": "input_blocks.1.0.in_layers.2",
       "up_blocks.1.resnets.0.time_emb_proj": "output_blocks.2.0.emb_layers.1"}
KOHYA = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
# diffusers' kohya converter renames a text encoder's self_attn LoRA for another CLIP layout
# (tests/test_adapters.py), so the kohya files compared with diffusers leave those out.
SELF_ATTN = ".self_attn."


def _factors(ref, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """"<network>.<module>" -> (down, up) in PyTorch layouts, shaped from the torch modules."""
    rng = np.random.RandomState(seed)
    out = {}
    for net, names in (("unet", UNET), ("text_encoder", TE), ("text_encoder_2", TE2)):
        modules = dict(getattr(ref, net).named_modules())
        for name in names:
            # (transformers 5's CLIPTextModel has no text_model. level)
            w = (modules.get(name) or modules[name.removeprefix("text_model.")]).weight
            down = (RANK, w.shape[1], *w.shape[2:])
            up = (w.shape[0], RANK) + ((1, 1) if w.ndim == 4 else ())
            out[f"{net}.{name}"] = (rng.randn(*down).astype(np.float32) * 0.3,
                                    rng.randn(*up).astype(np.float32) * 0.3)
    return out


def write_peft(path, factors, alpha: float):
    """diffusers' SDXL layout: unet./text_encoder./text_encoder_2. + lora_A/lora_B, alpha in
    the PEFT config diffusers keeps in the metadata."""
    tensors = {}
    for name, (down, up) in factors.items():
        tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = down, up
    config = {}
    for net in KOHYA:
        targets = [n.partition(".")[2] for n in factors if n.startswith(net + ".")]
        config.update({f"{net}.r": RANK, f"{net}.lora_alpha": alpha,
                       f"{net}.target_modules": [t.removeprefix("text_model.")
                                                 for t in targets]})
    save_safetensors(tensors, path, {"format": "pt", "lora_adapter_metadata": json.dumps(config)})
    return path


def write_kohya(path, factors, alpha: float, sgm: bool, skip: str | None = None):
    """kohya's layout (lora_unet_/lora_te1_/lora_te2_, lora_down/lora_up, alpha per module):
    SGM UNet names as sd-scripts writes SDXL LoRAs, or diffusers UNet names as LCM-LoRA's
    pytorch_lora_weights.safetensors has them (diffusers' consistency-distillation scripts,
    get_module_kohya_state_dict: PEFT's names with underscores, lora_down/lora_up, alpha)."""
    return save_kohya(path, factors, alpha, KOHYA, SGM if sgm else None,
                      (skip,) if skip else ())


@pytest.fixture(scope="module")
def reference(sdxl_folder):
    from diffusers import StableDiffusionXLPipeline as TorchPipeline

    def make():
        ref = TorchPipeline.from_pretrained(str(sdxl_folder))
        ref.scheduler = diffusers_scheduler("euler", ref.scheduler.config)
        return ref
    return make


@pytest.fixture(scope="module")
def ours(sdxl_folder):
    return sdjax.StableDiffusionXLPipeline.from_pretrained(str(sdxl_folder), dtype="float32",
                                                          num_devices=1)


LATENTS = np.random.RandomState(0).randn(1, SIZE // 2, SIZE // 2, 4).astype(np.float32)


def _theirs(pipe, prompt):
    with torch.no_grad():
        return pipe(prompt, latents=torch.from_numpy(LATENTS.transpose(0, 3, 1, 2).copy()),
                    num_inference_steps=STEPS, height=SIZE, width=SIZE, guidance_scale=7.5,
                    output_type="np").images


def _ours(pipe, prompt):
    return pipe(prompt, num_inference_steps=STEPS, height=SIZE, width=SIZE, latents=LATENTS,
                guidance_scale=7.5, scheduler="euler", output_type="float").images


def _flat(pipe) -> dict:
    return {(net, p): np.asarray(v.get_value()) for net, state in pipe.params.items()
            for p, v in nnx.to_flat_state(state)}


def _unchanged(pipe, before: dict) -> bool:
    after = _flat(pipe)
    return after.keys() == before.keys() and all(
        np.array_equal(after[k], v) for k, v in before.items())


def _embedding(tmp_path, rng) -> tuple:
    """An SDXL embedding file of two vectors (the WebUI's clip_l/clip_g layout)."""
    vectors = {"clip_l": rng.randn(2, 32).astype(np.float32) * 0.5,
               "clip_g": rng.randn(2, 48).astype(np.float32) * 0.5}
    save_safetensors(vectors, tmp_path / "glowxl.safetensors")
    return tmp_path / "glowxl.safetensors", vectors


def test_lora_and_embedding_match_diffusers(ours, reference, tmp_path):
    """One compile: an SDXL embedding and three LoRA dialects stacked (diffusers/PEFT, kohya
    SGM names, LCM-LoRA's kohya-with-diffusers-names), a rescale, then no LoRA."""
    ref = reference()
    factors = [_factors(ref, seed) for seed in range(3)]
    peft = write_peft(tmp_path / "peft.safetensors", factors[0], alpha=8.0)
    kohya = write_kohya(tmp_path / "kohya.safetensors", factors[1], 2.0, sgm=True,
                        skip=SELF_ATTN)
    lcm = write_kohya(tmp_path / "lcm.safetensors", factors[2], 4.0, sgm=False, skip=SELF_ATTN)
    emb, vectors = _embedding(tmp_path, np.random.RandomState(7))
    prompt = "a glowxl circle on a blue background"

    pristine = _flat(ours)
    assert ours.load_textual_inversion(emb) == "glowxl"
    for table, tok, rows in ((ours.network("text_encoder"), ours.tokenizer, vectors["clip_l"]),
                             (ours.network("text_encoder_2"), ours.tokenizer_2,
                              vectors["clip_g"])):
        ids = tok.convert_tokens_to_ids(["glowxl", "glowxl_1"])
        np.testing.assert_array_equal(
            np.asarray(table.embeddings.token_embedding.embedding.get_value())[ids], rows)
    ours.load_lora(peft, 0.9)
    ours.load_lora(peft, 0.5)   # a new scale re-merges from the original weights
    ours.load_lora(kohya, 0.5)
    ours.load_lora(lcm, 0.5)
    image = _ours(ours, prompt)
    compiles = ours.compile_count

    ref.load_textual_inversion(torch.from_numpy(vectors["clip_l"]), token="glowxl",
                               text_encoder=ref.text_encoder, tokenizer=ref.tokenizer)
    ref.load_textual_inversion(torch.from_numpy(vectors["clip_g"]), token="glowxl",
                               text_encoder=ref.text_encoder_2, tokenizer=ref.tokenizer_2)
    for f in (peft, kohya, lcm):
        ref.load_lora_weights(str(f), adapter_name=f.stem)
    ref.set_adapters([f.stem for f in (peft, kohya, lcm)])
    ref.fuse_lora(lora_scale=0.5)
    err = np.abs(image - _theirs(ref, prompt)).max()
    print(f"sdxl embedding + peft + kohya + lcm LoRAs x0.5: max abs pixel error {err:.2e}")
    assert err < TOL

    ours.set_loras({})
    plain = _ours(ours, prompt)
    assert ours.compile_count == compiles   # re-merges reuse the one executable
    assert np.abs(image - plain).max() > 100 * TOL   # the LoRAs do change the image
    after = _flat(ours)
    grown = {("text_encoder", "embeddings.token_embedding.embedding"),
             ("text_encoder_2", "embeddings.token_embedding.embedding")}
    assert all(np.array_equal(after[k], v) for k, v in pristine.items()
               if (k[0], ".".join(map(str, k[1]))) not in grown)


def test_kohya_and_peft_names_merge_alike(ours, reference, tmp_path):
    """te1, te2 and SGM/diffusers UNet names give the PEFT file's parameters bit for bit;
    unloading restores the originals bit for bit."""
    factors = _factors(reference(), seed=5)
    files = [write_peft(tmp_path / "p.safetensors", factors, alpha=2.0),
             write_kohya(tmp_path / "k.safetensors", factors, 2.0, sgm=True),
             write_kohya(tmp_path / "d.safetensors", factors, 2.0, sgm=False)]
    before = _flat(ours)
    merged = []
    for f in files:
        ours.set_loras({f: 0.7})
        merged.append(_flat(ours))
    ours.set_loras({})
    assert _unchanged(ours, before)
    changed = {k for k, v in merged[0].items() if not np.array_equal(v, before[k])}
    assert {k[0] for k in changed} == {"unet", "text_encoder", "text_encoder_2"}
    assert len(changed) == len(factors)
    for other in merged[1:]:
        assert all(np.array_equal(other[k], v) for k, v in merged[0].items())


def test_other_family_files_fail_and_change_nothing(ours, sd1_folder, reference, tmp_path):
    from tests.test_adapters import write_kohya_lora, write_peft_lora

    before = _flat(ours)
    sd1_kohya = write_kohya_lora(tmp_path / "sd1_kohya.safetensors")
    with pytest.raises(ValueError, match=r"an SD1\.x/SD2\.x LoRA \(it has lora_te_.*this "
                                         "model is SDXL"):
        ours.load_lora(sd1_kohya)
    with pytest.raises(ValueError, match="does not have"):  # SD1's UNet names
        ours.load_lora(write_peft_lora(tmp_path / "sd1_peft.safetensors"))
    save_safetensors({"emb_params": np.ones((1, 32), np.float32)}, tmp_path / "sd1.safetensors")
    with pytest.raises(ValueError, match="not an SDXL embedding"):
        ours.load_textual_inversion(tmp_path / "sd1.safetensors")
    assert ours.loras == {}
    assert _unchanged(ours, before)

    sd1 = sdjax.StableDiffusionPipeline.from_pretrained(str(sd1_folder), dtype="float32",
                                                        num_devices=1)
    sd1_before = _flat(sd1)
    sdxl_file = write_kohya(tmp_path / "xl.safetensors", _factors(reference(), 1), 1.0, sgm=True)
    with pytest.raises(ValueError, match="an SDXL LoRA .*this model is SD1"):
        sd1.load_lora(sdxl_file)
    emb, _ = _embedding(tmp_path, np.random.RandomState(1))
    with pytest.raises(ValueError, match="an SDXL embedding"):
        sd1.load_textual_inversion(emb)
    assert _unchanged(sd1, sd1_before)


def test_refiner_takes_clip_g_and_lora_te2(sdxl_refiner_folder, tmp_path):
    """A refiner's one encoder (text_encoder slot) is SDXL's second: lora_te2_ and clip_g."""
    refiner = sdjax.StableDiffusionXLPipeline.from_pretrained(
        str(sdxl_refiner_folder), dtype="float32", num_devices=1)
    emb, vectors = _embedding(tmp_path, np.random.RandomState(2))
    assert refiner.load_textual_inversion(emb) == "glowxl"
    ids = refiner.tokenizer.convert_tokens_to_ids(["glowxl", "glowxl_1"])
    table = refiner.network("text_encoder").embeddings.token_embedding.embedding.get_value()
    np.testing.assert_array_equal(np.asarray(table)[ids], vectors["clip_g"])

    module = "text_model.encoder.layers.1.mlp.fc1"   # 48 -> 64 in text_encoder_2
    rng = np.random.RandomState(3)
    down, up = rng.randn(RANK, 48).astype(np.float32), rng.randn(64, RANK).astype(np.float32)
    path = tmp_path / "refiner_te2.safetensors"
    save_safetensors({f"lora_te2_{module.replace('.', '_')}.lora_down.weight": down,
                      f"lora_te2_{module.replace('.', '_')}.lora_up.weight": up}, path)
    kernel = refiner.network("text_encoder").encoder.layers[1].mlp.fc1.kernel
    before = np.asarray(kernel.get_value())
    refiner.load_lora(path)
    kernel = refiner.network("text_encoder").encoder.layers[1].mlp.fc1.kernel
    np.testing.assert_allclose(np.asarray(kernel.get_value()) - before, (up @ down).T,
                               rtol=1e-5, atol=1e-5)


def test_cli_lora_tag_and_embedding_on_sdxl(sdxl_folder, ours, reference, tmp_path, capfd,
                                            monkeypatch):
    """`<lora:name:w>` and --embedding reach SDXL through set_loras and the pipeline's own
    load_textual_inversion: no CLI code of their own."""
    from sdjax.sample import main

    loaded = []
    real = sdjax.StableDiffusionXLPipeline.from_pretrained.__func__

    def keep(cls, *args, **kw):
        loaded.append(real(cls, *args, **kw))
        return loaded[-1]

    monkeypatch.setattr(sdjax.StableDiffusionXLPipeline, "from_pretrained", classmethod(keep))
    (tmp_path / "loras").mkdir()
    write_kohya(tmp_path / "loras" / "xlstyle.safetensors", _factors(reference(), 4), 2.0,
                sgm=True)
    emb, vectors = _embedding(tmp_path, np.random.RandomState(5))
    assert main(["--model", str(sdxl_folder), "--prompt", "a glowxl cat <lora:xlstyle:0.7>",
                 "--steps", "2", "--height", "16", "--width", "16", "--num_devices", "1",
                 "--lora_dir", str(tmp_path / "loras"), "--embedding", str(emb),
                 "--outdir", str(tmp_path / "out")]) == 0
    assert "embedding glowxl" in capfd.readouterr().err
    (png,) = (tmp_path / "out").glob("*.png")
    from PIL import Image
    assert Image.open(png).text["parameters"].startswith("a glowxl cat <lora:xlstyle:0.7>")
    (pipe,) = loaded
    assert {Path(k).name: s for k, s in pipe.loras.items()} == {"xlstyle.safetensors": 0.7}
    for tok in (pipe.tokenizer, pipe.tokenizer_2):
        assert {"glowxl", "glowxl_1"} <= set(tok.get_vocab())
    # the tag's LoRA is merged into both encoders and the UNet (ours: the pristine weights)
    merged, pristine = _flat(pipe), _flat(ours)
    changed = {k[0] for k, v in pristine.items()
               if "token_embedding" not in str(k[1]) and not np.array_equal(merged[k], v)}
    assert changed == {"unet", "text_encoder", "text_encoder_2"}
