"""StableDiffusionXLPipeline: SDXL on the same sampling core as Stable Diffusion 1.x/2.x.

What SDXL changes is the conditioning, so that is all this module adds (as
``sampling.Networks.encode`` and the batched inputs it reads):

- two text encoders: CLIP ViT-L (``text_encoder``, tokens of ``prompt``) and OpenCLIP ViT-bigG
  with its projection (``text_encoder_2``, tokens of ``prompt_2``, default ``prompt``); the
  UNet attends to both penultimate hidden states concatenated;
- the UNet's added conditioning: the second encoder's projected pooled output and six "time
  ids" per image, ``original_size + crops_coords_top_left + target_size`` (runtime inputs,
  like the prompts);
- ``force_zeros_for_empty_prompt``: with no negative prompt, the unconditional embeddings are
  zeros (diffusers' rule), not the encoding of "".

Everything else (validation, tasks, schedulers, sharding, decode) is StableDiffusionPipeline's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdjax import prompts as prompt_syntax
from sdjax import validation
from sdjax.pipeline import StableDiffusionPipeline
from sdjax.weights.errors import WeightsError

_SIZES = ("original_size", "crops_coords_top_left", "target_size")


class StableDiffusionXLPipeline(StableDiffusionPipeline):
    """Text-to-image (and img2img / inpainting through ``image=``) with SDXL base models.

    The call takes StableDiffusionPipeline's arguments plus ``prompt_2``,
    ``negative_prompt_2``, ``original_size``, ``crops_coords_top_left``, ``target_size`` and
    their ``negative_`` forms, with diffusers' meanings and defaults. See docs/python-api.md.
    """

    SDXL = True
    CONDITIONING_ARGS = ("prompt_2", "negative_prompt_2") + _SIZES + tuple(
        "negative_" + k for k in _SIZES)

    def __init__(self, *, text_encoder_2, tokenizer_2, force_zeros_for_empty_prompt: bool = True,
                 **kwargs):
        super().__init__(**kwargs)
        self.tokenizer_2 = tokenizer_2
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self._graphdefs["text_encoder_2"], self.params["text_encoder_2"] = nnx.split(
            text_encoder_2)
        unet = self.unet_config
        te2 = text_encoder_2.config
        if unet.addition_embed_type != "text_time":
            raise WeightsError("this UNet has no SDXL added conditioning "
                               "(addition_embed_type='text_time'): not an SDXL model")
        width = unet.addition_time_embed_dim * len(_SIZES) * 2 + te2.projection_dim
        if width != unet.projection_class_embeddings_input_dim:
            raise WeightsError(
                f"the UNet's added embedding takes {unet.projection_class_embeddings_input_dim} "
                f"values, but 6 time ids and text_encoder_2's projection make {width} (a "
                "refiner-style model with aesthetic scores is not supported yet)")
        context = text_encoder_2.config.hidden_size + self.network("text_encoder").config \
            .hidden_size
        if context != unet.cross_attention_dim:
            raise WeightsError(f"the two text encoders make {context}-wide states, the UNet "
                               f"attends to {unet.cross_attention_dim}")

    @classmethod
    def from_pretrained(cls, model: str, *args, **kwargs) -> StableDiffusionXLPipeline:
        """As :meth:`StableDiffusionPipeline.from_pretrained`, for SDXL diffusers folders (or hub
        ids of them): ``model_index.json`` with ``text_encoder_2`` and ``tokenizer_2``."""
        if Path(model).expanduser().is_file():
            raise WeightsError(f"{model}: SDXL single-file checkpoints are not supported yet; "
                               "use a diffusers folder (model_index.json, text_encoder_2/, ...)")
        return super().from_pretrained(model, *args, **kwargs)

    def save_pretrained(self, folder) -> Path:
        # The SD writer knows one text encoder; writing half a model would look complete.
        raise ValueError("saving SDXL pipelines is not supported yet")

    def save_single_file(self, path, half: bool = False) -> Path:
        raise ValueError("saving SDXL pipelines is not supported yet")

    # ------------------------------------------------------------------ host side
    def _conditioning_inputs(self, prompts: list[str], negatives: list[str], per_prompt: int,
                             height: int, width: int, no_negative: bool, chunks: int, *,
                             prompt_2=None,
                             negative_prompt_2=None, original_size=None,
                             crops_coords_top_left=None, target_size=None,
                             negative_original_size=None, negative_crops_coords_top_left=None,
                             negative_target_size=None) -> dict:
        n = len(prompts)
        prompts_2 = _texts(prompt_2, "prompt_2", n) or prompts
        # diffusers: negative_prompt_2 defaults to negative_prompt (itself "" when absent).
        negatives_2 = _texts(negative_prompt_2, "negative_prompt_2", n) or negatives
        original = _pair(original_size, "original_size", (height, width))
        crops = _pair(crops_coords_top_left, "crops_coords_top_left", (0, 0))
        target = _pair(target_size, "target_size", (height, width))
        neg = original + crops + target
        # diffusers uses the negative sizes only when both are given (and then the negative
        # crop, default (0, 0)); anything less it would ignore, which we refuse instead.
        if negative_original_size is not None and negative_target_size is not None:
            neg = (_pair(negative_original_size, "negative_original_size", None)
                   + _pair(negative_crops_coords_top_left, "negative_crops_coords_top_left",
                           (0, 0))
                   + _pair(negative_target_size, "negative_target_size", None))
        elif (negative_original_size, negative_target_size,
              negative_crops_coords_top_left) != (None, None, None):
            raise ValueError("negative_original_size and negative_target_size go together "
                             "(with negative_crops_coords_top_left optional)")
        time_ids = np.asarray([neg, original + crops + target], np.float32)

        def per_image(rows: np.ndarray) -> np.ndarray:
            return np.repeat(rows, per_prompt, axis=0)

        zero = no_negative and self.force_zeros_for_empty_prompt
        # The second encoder's chunks, in the first's count (sdjax.prompts: each prompt's
        # chunks repeat to fill it, so the count must be one they all divide).
        ids_2, weights_2 = prompt_syntax.prompt_arrays(prompts_2 + negatives_2, self.tokenizer_2)
        if chunks % ids_2.shape[1]:
            raise ValueError(f"prompt_2 / negative_prompt_2 need a context of {ids_2.shape[1]} "
                             f"chunks of 75 tokens and prompt / negative_prompt {chunks}: "
                             "make their lengths match, or generate them in separate calls")
        ids_2, weights_2 = (np.tile(a, (1, chunks // a.shape[1], 1)) for a in (ids_2, weights_2))
        return {"ids_2": per_image(ids_2[:n]), "weights_2": per_image(weights_2[:n]),
                "neg_ids_2": per_image(ids_2[n:]), "neg_weights_2": per_image(weights_2[n:]),
                "time_ids": np.broadcast_to(time_ids, (n * per_prompt, 2, 6)).copy(),
                "zero_negative": np.full((n * per_prompt,), zero, np.bool_)}

    # ------------------------------------------------------------------ compiled part
    def _encode(self, params, ids, neg_ids, inputs, clip_skip: int) -> tuple[jax.Array, dict]:
        """sampling.Networks.encode for SDXL: (context, added_cond) of [negatives; prompts].
        Both encoders' chunks get the WebUI's emphasis (sdjax.prompts.emphasize) each; the
        pooled output is the first chunk's, as the WebUI takes it."""
        if clip_skip != 1:
            raise ValueError("clip_skip does not apply to SDXL, which conditions on both text "
                             "encoders' penultimate layers")
        te = nnx.merge(self._graphdefs["text_encoder"], params["text_encoder"])
        te2 = nnx.merge(self._graphdefs["text_encoder_2"], params["text_encoder_2"])
        ids_1, weights_1 = (jnp.concatenate(pair) for pair in zip(neg_ids, ids, strict=True))
        states = prompt_syntax.emphasize(lambda flat: te.hidden_states(flat)[-2],
                                         ids_1, weights_1)
        ids_2 = jnp.concatenate([inputs["neg_ids_2"], inputs["ids_2"]])
        weights_2 = jnp.concatenate([inputs["neg_weights_2"], inputs["weights_2"]])
        last = {}

        def forward_2(flat):
            hidden = te2.hidden_states(flat)
            last["states"] = hidden[-1]
            return hidden[-2]

        states_2 = prompt_syntax.emphasize(forward_2, ids_2, weights_2)
        n, c, t = ids_2.shape
        first = last["states"].reshape(n, c, t, -1)[:, 0]
        pooled = te2.text_projection(te2.pool(ids_2[:, 0], first))
        context = jnp.concatenate([states, states_2.astype(states.dtype)], axis=-1)
        zero = jnp.concatenate([inputs["zero_negative"],
                                jnp.zeros_like(inputs["zero_negative"])])
        context = jnp.where(zero[:, None, None], 0, context)
        pooled = jnp.where(zero[:, None], 0, pooled)
        time_ids = jnp.concatenate([inputs["time_ids"][:, 0], inputs["time_ids"][:, 1]])
        return context, {"text_embeds": pooled, "time_ids": time_ids}


def _texts(value, name: str, n: int) -> list[str] | None:
    """None, one string for every prompt, or one per prompt -> a list of ``n`` (or None)."""
    texts = validation.check_prompts(value, name, allow_none=True,
                                     count=None if isinstance(value, str) else n)
    return None if texts is None else texts * (n // len(texts))


def _pair(value, name: str, default: tuple) -> tuple[float, float]:
    """An (height, width)-style pair of non-negative numbers; ``default`` when None."""
    if value is None:
        return tuple(default)
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)) \
            or len(value) != 2:
        raise ValueError(f"{name} must be a pair of numbers (height, width) or (top, left), "
                         f"got {value!r}")
    return tuple(validation.check_number(v, f"{name}[{i}]", minimum=0)
                 for i, v in enumerate(value))


__all__ = ["StableDiffusionXLPipeline"]
