"""Tiny random Stable Diffusion models built with diffusers/transformers (PyTorch), the
oracle of the tests. Nothing is downloaded: the tokenizer vocabulary is written here."""

from __future__ import annotations

from pathlib import Path

import torch

from sdjax.train.tokenizer import write_clip_tokenizer as _write_clip_tokenizer

SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None,
}
SD21_SCHEDULER = {
    "_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
    "prediction_type": "v_prediction", "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "trained_betas": None,
}


WORDS = ["a", "red", "green", "blue", "circle", "square", "on", "background", "cat", "photo"]


def write_clip_tokenizer(folder: Path, *, pad_token: str = "<|endoftext|>") -> int:
    """A byte-level CLIP vocabulary with whole-word merges for WORDS; returns its size."""
    return _write_clip_tokenizer(folder, WORDS, pad_token=pad_token)


def randomize_(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """diffusers zero-initialises output convs; perturb every parameter so nothing is
    trivially zero and every weight matters to the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def tiny_components(kind: str = "sd1", seed: int = 0, full: bool = False, *,
                    unet_in_channels: int = 4):
    """(unet, vae, text_encoder) torch modules shaped like SD1 or SD2, but tiny. ``full``:
    the whole SD block structure (4 levels, 2 layers per block: every kind of block a
    single file's layout has) at small channel counts; ``unet_in_channels=9``: an inpainting
    UNet."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    sd2 = kind == "sd2"
    ctx = 48 if sd2 else 32
    if full:
        levels = dict(layers_per_block=2, block_out_channels=(16, 32, 32, 32),
                      down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                      up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                      attention_head_dim=(2, 4, 4, 4) if sd2 else 4)
        vae_levels = dict(block_out_channels=(8, 16, 16, 16), layers_per_block=2,
                          down_block_types=("DownEncoderBlock2D",) * 4,
                          up_block_types=("UpDecoderBlock2D",) * 4)
    else:
        levels = dict(layers_per_block=1, block_out_channels=(32, 64),
                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                      attention_head_dim=(2, 4) if sd2 else 8)
        vae_levels = dict(block_out_channels=(16, 32), layers_per_block=1,
                          down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=unet_in_channels, out_channels=4, cross_attention_dim=ctx,
        norm_num_groups=8, use_linear_projection=sd2, upcast_attention=sd2, **levels)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
                        sample_size=16, **vae_levels)
    te = CLIPTextModel(CLIPTextConfig(
        vocab_size=_vocab_size(), hidden_size=ctx, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77,
        hidden_act="gelu" if sd2 else "quick_gelu", bos_token_id=_vocab_size() - 2,
        eos_token_id=_vocab_size() - 1, pad_token_id=1))
    for i, m in enumerate((unet, vae, te)):
        randomize_(m, seed * 10 + i)
        m.eval()
    return unet, vae, te


def _vocab_size() -> int:
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        return write_clip_tokenizer(Path(d))


def save_tiny_pipeline(folder: Path, kind: str = "sd1", seed: int = 0,
                       full: bool = False, *, unet_in_channels: int = 4) -> Path:
    """A complete diffusers folder as StableDiffusionPipeline.save_pretrained writes it."""
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    unet, vae, te = tiny_components(kind, seed, full, unet_in_channels=unet_in_channels)
    tok_dir = folder.parent / f"{folder.name}-tokenizer-src"
    write_clip_tokenizer(tok_dir, pad_token="!" if kind == "sd2" else "<|endoftext|>")
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    scheduler = (DDIMScheduler.from_config(SD21_SCHEDULER) if kind == "sd2"
                 else PNDMScheduler.from_config(SD15_SCHEDULER))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder))
    return folder


def diffusers_scheduler(name: str, config: dict):
    """The diffusers scheduler that our scheduler ``name`` reproduces, from ``config``."""
    import diffusers

    from sdjax.schedulers import diffusers_equivalent

    cls, extra = diffusers_equivalent(name)
    return getattr(diffusers, cls).from_config(config, **extra)


UPSCALER_SCHEDULER = {
    "_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
    "prediction_type": "v_prediction", "set_alpha_to_one": False, "steps_offset": 1,
}
UPSCALER_LOW_RES_SCHEDULER = {
    "_class_name": "DDPMScheduler", "beta_end": 0.02, "beta_schedule": "scaled_linear",
    "beta_start": 0.0001, "clip_sample": True, "num_train_timesteps": 1000,
    "variance_type": "fixed_small",
}


def save_tiny_upscaler(folder: Path, seed: int = 3) -> Path:
    """A tiny model in the stable-diffusion-x4-upscaler layout: a 7-channel UNet with a
    noise-level class embedding and text-only first attention (only_cross_attention) at its
    first level, a VAE with factor 4, a low-res DDPM scheduler."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionUpscalePipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTokenizer

    _, _, te = tiny_components("sd2", seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=7, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=48,
        norm_num_groups=8, attention_head_dim=8, use_linear_projection=True,
        num_class_embeds=1000, only_cross_attention=(True, False))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=8, sample_size=32, scaling_factor=0.08333)
    for i, m in enumerate((unet, vae)):
        randomize_(m, seed * 10 + 5 + i)
        m.eval()
    tok_dir = folder.parent / f"{folder.name}-tokenizer-src"
    write_clip_tokenizer(tok_dir, pad_token="!")
    pipe = StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=te, tokenizer=CLIPTokenizer.from_pretrained(str(tok_dir)),
        unet=unet, low_res_scheduler=DDPMScheduler.from_config(UPSCALER_LOW_RES_SCHEDULER),
        scheduler=DDIMScheduler.from_config(UPSCALER_SCHEDULER), max_noise_level=350)
    pipe.save_pretrained(str(folder))
    return folder


SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}


def tiny_sdxl_components(seed: int = 20):
    """(unet, vae, text_encoder, text_encoder_2) torch modules shaped like SDXL base, tiny: a
    plain first level then cross-attention levels of different transformer depths, linear
    projections, the "text_time" added embedding, two CLIP encoders (the second with its
    text projection) whose penultimate states concatenate into the UNet's context."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    vocab = _vocab_size()
    te_args = dict(vocab_size=vocab, intermediate_size=64, num_hidden_layers=3,
                   max_position_embeddings=77, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                   pad_token_id=1)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=32, num_attention_heads=4,
                                      hidden_act="quick_gelu", **te_args))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=48, num_attention_heads=4, hidden_act="gelu", projection_dim=24, **te_args))
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 2, 4),
        cross_attention_dim=32 + 48, norm_num_groups=8, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=24 + 6 * time_dim)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
                        sample_size=16, block_out_channels=(16, 32), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, scaling_factor=0.13025,
                        force_upcast=True)
    for i, m in enumerate((unet, vae, te, te2)):
        randomize_(m, seed * 10 + i)
        m.eval()
    return unet, vae, te, te2


def save_tiny_sdxl(folder: Path, seed: int = 20):
    """A complete tiny SDXL base folder as diffusers' StableDiffusionXLPipeline writes it
    (the second tokenizer pads with "!", as SDXL's does); returns (folder, the pipeline)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    unet, vae, te, te2 = tiny_sdxl_components(seed)
    toks = []
    for i, pad in enumerate(("<|endoftext|>", "!")):
        tok_dir = folder.parent / f"{folder.name}-tokenizer{i}-src"
        write_clip_tokenizer(tok_dir, pad_token=pad)
        toks.append(CLIPTokenizer.from_pretrained(str(tok_dir)))
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=toks[0], tokenizer_2=toks[1],
        unet=unet, scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER))
    pipe.save_pretrained(str(folder))
    return folder, pipe


def tiny_sdxl_refiner_unet(seed: int = 22):
    """A UNet shaped like the SDXL refiner's, tiny: four levels (plain, cross-attention,
    cross-attention, plain) of one transformer depth (2) throughout, a context as wide as
    text_encoder_2's states alone (48), and five time ids (sizes and an aesthetic score)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32, 32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                          "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=2, attention_head_dim=(2, 2, 4, 4),
        cross_attention_dim=48, norm_num_groups=8, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=24 + 5 * time_dim)
    randomize_(unet, seed * 10)
    return unet.eval()


def save_tiny_sdxl_refiner(folder: Path, seed: int = 20):
    """A tiny SDXL refiner folder as diffusers writes one (StableDiffusionXLImg2ImgPipeline
    without text_encoder/tokenizer, requires_aesthetics_score, no zero negatives). Like the
    real pair it shares the VAE and text_encoder_2 of save_tiny_sdxl's base of the same
    ``seed``; returns (folder, the pipeline)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline
    from transformers import CLIPTokenizer

    _, vae, _, te2 = tiny_sdxl_components(seed)
    tok_dir = folder.parent / f"{folder.name}-tokenizer-src"
    write_clip_tokenizer(tok_dir, pad_token="!")
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=vae, text_encoder=None, text_encoder_2=te2, tokenizer=None,
        tokenizer_2=CLIPTokenizer.from_pretrained(str(tok_dir)),
        unet=tiny_sdxl_refiner_unet(seed + 2),
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    pipe.save_pretrained(str(folder))
    return folder, pipe


def save_tiny_controlnet(folder: Path, model_folder: Path, seed: int = 30,
                         embedding_channels: tuple[int, ...] = (8, 16)) -> Path:
    """A diffusers ControlNetModel folder made from ``model_folder``'s UNet (diffusers'
    ``from_unet``), every weight randomized (the zero convolutions included, else they would
    hand the UNet nothing). ``embedding_channels``: one stride-2 conv per step, as many as
    the VAE's factor needs (two levels: factor 2)."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(model_folder / "unet"))
    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=embedding_channels)
    randomize_(net, seed, scale=0.1)
    net.eval().save_pretrained(str(folder))
    return folder
