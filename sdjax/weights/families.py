"""The Stable Diffusion families a single file can be, and telling which one it is.

A single file carries weights only. Each family here brings what the file lacks: the network
configs, the tokenizers' padding tokens and the scheduler config of the reference repository
(SD 1.x: stable-diffusion-v1-5; SD 2.x: stable-diffusion-2-1 / -2-base; SDXL:
stable-diffusion-xl-base-1.0 / -refiner-1.0). The
family is read from tensor names and shapes (from a safetensors header or a pickle's tensor
metadata, without reading tensor data), never from the file name.
"""

from __future__ import annotations

import dataclasses

from sdjax.models.clip_text import CLIPTextConfig
from sdjax.models.unet import UNetConfig
from sdjax.models.vae import VAEConfig
from sdjax.weights.compvis_names import (
    CLIP_PREFIX,
    OPENCLIP_PREFIX,
    REFINER_OPENCLIP_PREFIX,
    SDXL_CLIP_PREFIX,
    SDXL_OPENCLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
)
from sdjax.weights.errors import WeightsError

PREDICTION_TYPES = ("epsilon", "v_prediction")

_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
          "num_train_timesteps": 1000, "clip_sample": False, "set_alpha_to_one": False,
          "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
# scheduler/scheduler_config.json of stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-base
PNDM_CONFIG = {"_class_name": "PNDMScheduler", **_BETAS, "prediction_type": "epsilon"}
# ... and of stabilityai/stable-diffusion-2-1 (the 768 v-prediction model)
DDIM_V_CONFIG = {"_class_name": "DDIMScheduler", **_BETAS, "prediction_type": "v_prediction"}
# scheduler/scheduler_config.json of stabilityai/stable-diffusion-xl-base-1.0 (the refiner's
# is the same), without its _diffusers_version.
SDXL_EULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "clip_sample": False, "interpolation_type": "linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}
# The two kinds of SDXL checkpoint (Family.sdxl, sdxl_kind).
SDXL_BASE, SDXL_REFINER = "base", "refiner"


@dataclasses.dataclass(frozen=True)
class Family:
    name: str                    # the preset name config= takes
    label: str                   # for messages
    unet: UNetConfig
    vae: VAEConfig
    text_encoder: CLIPTextConfig
    openclip: bool               # SD 2.x: OpenCLIP text tower keys, padding with "!"
    prediction_type: str         # the family's default
    # SDXL: "base" (text_encoder CLIP ViT-L + text_encoder_2 OpenCLIP bigG) or "refiner"
    # (``text_encoder`` is OpenCLIP bigG with its projection, the folder's text_encoder_2).
    sdxl: str | None = None
    text_encoder_2: CLIPTextConfig | None = None

    @property
    def pad_token(self) -> str:
        return "!" if self.openclip else "<|endoftext|>"

    def scheduler_config(self, prediction_type: str) -> dict:
        """The reference repository's scheduler config for that prediction type: DDIM for
        SD 2.x v-prediction (as stable-diffusion-2-1), Euler for SDXL, PNDM otherwise."""
        if self.sdxl:
            return {**SDXL_EULER_CONFIG, "prediction_type": prediction_type}
        base = DDIM_V_CONFIG if (self.openclip and prediction_type == "v_prediction") \
            else PNDM_CONFIG
        return {**base, "prediction_type": prediction_type}

    def for_prediction(self, prediction_type: str) -> Family:
        """SD 2.x: the v-model is the 768 one (stable-diffusion-2-1), epsilon the 512 base."""
        if not self.openclip or self.unet.in_channels != 4 or self.sdxl:
            return dataclasses.replace(self, prediction_type=prediction_type)
        return PRESETS["sd21-v" if prediction_type == "v_prediction" else "sd21"]


_SD21_UNET = UNetConfig.sd21()
PRESETS: dict[str, Family] = {f.name: f for f in (
    Family("sd15", "SD 1.x", UNetConfig.sd15(), VAEConfig.sd15(), CLIPTextConfig.sd15(),
            False, "epsilon"),
    Family("sd15-inpainting", "SD 1.x inpainting",
            dataclasses.replace(UNetConfig.sd15(), in_channels=9), VAEConfig.sd15(),
            CLIPTextConfig.sd15(), False, "epsilon"),
    Family("sd21", "SD 2.x (512, epsilon)", dataclasses.replace(_SD21_UNET, sample_size=64),
            VAEConfig.sd15(), CLIPTextConfig.sd21(), True, "epsilon"),
    Family("sd21-v", "SD 2.x (768, v-prediction)", _SD21_UNET, VAEConfig.sd21(),
            CLIPTextConfig.sd21(), True, "v_prediction"),
    Family("sd2-inpainting", "SD 2.x inpainting",
            dataclasses.replace(_SD21_UNET, sample_size=64, in_channels=9), VAEConfig.sd15(),
            CLIPTextConfig.sd21(), True, "epsilon"),
    Family("sdxl", "SDXL base", UNetConfig.sdxl_base(), VAEConfig.sdxl(), CLIPTextConfig.sd15(),
           False, "epsilon", SDXL_BASE, CLIPTextConfig.sdxl_2()),
    Family("sdxl-refiner", "SDXL refiner", UNetConfig.sdxl_refiner(), VAEConfig.sdxl(),
           CLIPTextConfig.sdxl_2(), True, "epsilon", SDXL_REFINER),
)}


SD_PRESETS = [name for name, f in PRESETS.items() if not f.sdxl]


def _shape(tensors, key: str) -> tuple[int, ...] | None:
    return tuple(tensors.shape(key)) if key in tensors else None


def sdxl_kind(tensors) -> str | None:
    """"base" or "refiner" for an SDXL checkpoint (from its text encoders' key names), else
    None."""
    keys = list(tensors)
    if any(k.startswith(SDXL_OPENCLIP_PREFIX) or k.startswith(SDXL_CLIP_PREFIX) for k in keys):
        return SDXL_BASE
    if any(k.startswith(REFINER_OPENCLIP_PREFIX) for k in keys):
        return SDXL_REFINER
    return None


def describe(tensors) -> str | None:
    """What a file that is not a full SD 1.x/2.x/SDXL checkpoint is, or None if it may be one."""
    keys = list(tensors)
    if any(k.startswith("conditioner.embedders.") for k in keys) and sdxl_kind(tensors) is None:
        return "an SGM checkpoint whose text encoders are neither SDXL base's nor its refiner's"
    if any(k.startswith("control_model.") for k in keys):
        return "a ControlNet, not a Stable Diffusion model"
    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_down." in k or ".lora_A." in k
           or ".lora_B." in k or "lora.down" in k for k in keys):
        return "a LoRA (an add-on to a model, not a model)"
    if "emb_params" in keys or any(k.startswith("string_to_param.") for k in keys) or (
            keys and set(keys) <= {"clip_l", "clip_g", "string_to_token", "name", "step"}):
        return "a textual-inversion embedding, not a model"
    if any(k.startswith(UNET_PREFIX) for k in keys):
        in_ch = _shape(tensors, UNET_PREFIX + "input_blocks.0.0.weight")
        if in_ch is not None and len(in_ch) == 4 and in_ch[1] == 7:
            return "an x4 upscaler checkpoint, which sdjax does not load from a single file yet"
        return None
    vae = ("encoder.conv_in.weight", "decoder.conv_in.weight")
    if all(k in tensors or VAE_PREFIX + k in tensors for k in vae):
        return "a VAE alone (pass it as vae= / --vae with a model)"
    if "conv_in.weight" in tensors and any(k.startswith("down_blocks.") for k in keys):
        return "a diffusers UNet alone (load the diffusers folder it belongs to)"
    example = ", ".join(sorted(keys)[:3])
    return f"not a Stable Diffusion checkpoint ({len(keys)} tensors, e.g. {example})"


# (UNet conv_in width, added-conditioning MLP input width) of the SDXL checkpoints.
_SDXL_SHAPES = {SDXL_BASE: ("sdxl", 320, 2816), SDXL_REFINER: ("sdxl-refiner", 384, 2560)}


def _detect_sdxl(tensors, kind: str) -> Family:
    name, width, added = _SDXL_SHAPES[kind]
    conv_in = _shape(tensors, UNET_PREFIX + "input_blocks.0.0.weight")
    label = _shape(tensors, UNET_PREFIX + "label_emb.0.0.weight")
    if conv_in is None or label is None or conv_in[0] != width or label[-1] != added:
        raise WeightsError(
            f"{getattr(tensors, 'path', 'file')}: an SDXL {kind} checkpoint whose shapes are "
            f"not SDXL 1.0's (UNet conv_in {conv_in}, added embedding {label}); pass config= "
            "(--config) a diffusers SDXL folder with the matching configs")
    return PRESETS[name]


def detect(tensors) -> Family:
    """The family of a single file, from its tensor names and shapes."""
    what = describe(tensors)
    if what is not None:
        raise WeightsError(f"{getattr(tensors, 'path', 'file')}: {what}")
    kind = sdxl_kind(tensors)
    if kind is not None:
        return _detect_sdxl(tensors, kind)
    conv_in = _shape(tensors, UNET_PREFIX + "input_blocks.0.0.weight")
    to_k = _shape(tensors, UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    openclip = any(k.startswith(OPENCLIP_PREFIX) for k in tensors)
    clip = any(k.startswith(CLIP_PREFIX) for k in tensors)
    found = None
    if conv_in is not None and to_k is not None and len(conv_in) == 4 and conv_in[0] == 320:
        ctx, in_ch = to_k[-1], conv_in[1]
        if ctx == 768 and clip and not openclip:
            found = {4: "sd15", 9: "sd15-inpainting"}.get(in_ch)
        elif ctx == 1024 and openclip and not clip:
            found = {4: "sd21-v", 9: "sd2-inpainting"}.get(in_ch)
    if found is None:
        raise WeightsError(
            f"{getattr(tensors, 'path', 'file')}: a Stable Diffusion checkpoint whose shapes "
            f"match no standard family (UNet conv_in {conv_in}, cross-attention key "
            f"{to_k}, text encoder {'OpenCLIP' if openclip else 'CLIP' if clip else 'none'}); "
            f"pass config= (--config) a preset ({', '.join(SD_PRESETS)}) or a diffusers folder "
            "with the matching configs")
    return PRESETS[found]
