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

The refiner (diffusers' ``StableDiffusionXLImg2ImgPipeline`` with ``requires_aesthetics_score``
and no ``text_encoder``) is the same class on a folder with one encoder: the UNet attends to
text_encoder_2's penultimate states alone (of ``prompt``, as diffusers pairs them), and its
five time ids are ``original_size + crops_coords_top_left + (aesthetic_score,)``.

Everything else (validation, tasks, schedulers, sharding, decode) is StableDiffusionPipeline's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdjax import model_defaults, validation
from sdjax import prompts as prompt_syntax
from sdjax.pipeline import StableDiffusionPipeline
from sdjax.weights.errors import WeightsError

_SIZES = ("original_size", "crops_coords_top_left", "target_size")
# diffusers' defaults for the refiner's aesthetic-score time id.
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5


class StableDiffusionXLPipeline(StableDiffusionPipeline):
    """Text-to-image (and img2img / inpainting through ``image=``) with SDXL base models, and
    img2img with SDXL refiners.

    The call takes StableDiffusionPipeline's arguments plus ``prompt_2``,
    ``negative_prompt_2``, ``original_size``, ``crops_coords_top_left``, ``target_size`` and
    their ``negative_`` forms, and for refiners ``aesthetic_score`` and
    ``negative_aesthetic_score`` in place of the target sizes and second prompts, with
    diffusers' meanings and defaults. A refiner's one encoder (its folder's
    ``text_encoder_2``) and tokenizer are this pipeline's ``text_encoder`` and ``tokenizer``,
    the ones every call encodes ``prompt`` with. See docs/python-api.md.
    """

    SDXL = True

    def __init__(self, *, text_encoder_2=None, tokenizer_2=None,
                 force_zeros_for_empty_prompt: bool = True,
                 requires_aesthetics_score: bool = False, tokenizer_2_dir: Path | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        self.tokenizer_2_dir = tokenizer_2_dir  # for saving; None = the bundled CLIP BPE
        if (text_encoder_2 is None) != (tokenizer_2 is None):
            raise ValueError("text_encoder_2 and tokenizer_2 go together (neither: a refiner, "
                             "whose one encoder is text_encoder)")
        # None: the refiner layout, one encoder (in the text_encoder slot).
        self.tokenizer_2 = tokenizer_2
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.requires_aesthetics_score = requires_aesthetics_score
        projected = self.text_encoder_config
        context = projected.hidden_size
        if text_encoder_2 is not None:
            self.store.add("text_encoder_2", text_encoder_2)
            projected = text_encoder_2.config
            context += projected.hidden_size
        unet = self.unet_config
        if unet.addition_embed_type != "text_time":
            raise WeightsError("this UNet has no SDXL added conditioning "
                               "(addition_embed_type='text_time'): not an SDXL model")
        ids = self.num_time_ids
        width = unet.addition_time_embed_dim * ids + projected.projection_dim
        if width != unet.projection_class_embeddings_input_dim:
            # diffusers' hint: one time id too many or too few is the aesthetic-score switch.
            hint = ""
            if abs(width - unet.projection_class_embeddings_input_dim) == \
                    unet.addition_time_embed_dim:
                hint = (" (model_index.json's requires_aesthetics_score should be "
                        f"{str(not requires_aesthetics_score).lower()})")
            raise WeightsError(
                f"the UNet's added embedding takes {unet.projection_class_embeddings_input_dim} "
                f"values, but {ids} time ids and the text encoder's projection make "
                f"{width}{hint}")
        if context != unet.cross_attention_dim:
            raise WeightsError(f"the text encoders make {context}-wide states, the UNet "
                               f"attends to {unet.cross_attention_dim}")

    @property
    def is_refiner(self) -> bool:
        """One text encoder (text_encoder_2 of the refiner's folder) instead of two."""
        return self.tokenizer_2 is None

    @property
    def num_time_ids(self) -> int:
        """Time ids per image: the sizes, or (refiners) sizes and an aesthetic score."""
        return 5 if self.requires_aesthetics_score else 6

    @classmethod
    def from_pretrained(cls, model: str, *args, **kwargs) -> StableDiffusionXLPipeline:
        """As :meth:`StableDiffusionPipeline.from_pretrained`, for SDXL diffusers folders (or hub
        ids of them): ``model_index.json`` with ``text_encoder_2`` and ``tokenizer_2``, and
        ``text_encoder``/``tokenizer`` too except in a refiner's (``[null, null]``); and for
        SDXL single files (``sd_xl_base_1.0.safetensors``, ``sd_xl_refiner_1.0.safetensors``:
        base or refiner detected from the tensors; ``config=`` the preset ``sdxl`` /
        ``sdxl-refiner`` or a diffusers SDXL folder)."""
        return super().from_pretrained(model, *args, **kwargs)

    def save_pretrained(self, folder) -> Path:
        """A diffusers SDXL folder (float32; a refiner's with ``text_encoder``/``tokenizer``
        ``[null, null]``) that diffusers' and sdjax's from_pretrained load."""
        from sdjax.weights.export import save_sdxl_pipeline
        folder = save_sdxl_pipeline(
            folder, unet=self.network("unet"), vae=self.network("vae"),
            text_encoder=self.network("text_encoder"), tokenizer=self.tokenizer,
            tokenizer_dir=self.tokenizer_dir,
            text_encoder_2=None if self.is_refiner else self.network("text_encoder_2"),
            tokenizer_2=self.tokenizer_2, tokenizer_2_dir=self.tokenizer_2_dir,
            scheduler_config=self.scheduler_config,
            force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt,
            requires_aesthetics_score=self.requires_aesthetics_score)
        model_defaults.write(folder, self.model_defaults)
        return folder

    def save_single_file(self, path, half: bool = False) -> Path:
        """An SGM-layout ``.safetensors`` (as ``sd_xl_base_1.0.safetensors``; float16 with
        ``half``) that the WebUI and diffusers' ``from_single_file`` load; written atomically."""
        self._refuse_embeddings_in_single_file()
        from sdjax.weights import file_configs
        from sdjax.weights.export import save_single_file
        nets = dict(unet=self.network("unet"), vae=self.network("vae"),
                    text_encoder=self.network("text_encoder"),
                    text_encoder_2=None if self.is_refiner else self.network("text_encoder_2"))
        meta = file_configs.metadata(  # loads back with no flags (file_configs)
            **nets, tokenizer=self.tokenizer, tokenizer_dir=self.tokenizer_dir,
            scheduler_config=self.scheduler_config, defaults=self.model_defaults,
            tokenizer_2=self.tokenizer_2, tokenizer_2_dir=self.tokenizer_2_dir,
            sdxl={"force_zeros_for_empty_prompt": self.force_zeros_for_empty_prompt,
                  "requires_aesthetics_score": self.requires_aesthetics_score})
        return save_single_file(path, **nets, half=half, metadata=meta)

    # ------------------------------------------------------------------ host side
    def _conditioning_inputs(self, prompts: list[str], negatives: list[str], per_prompt: int,
                             height: int, width: int, no_negative: bool, chunks: int,
                             stack=None, *, prompt_2=None, negative_prompt_2=None,
                             **time_args) -> dict:
        n = len(prompts)
        time_ids = self._time_ids(height, width, **time_args)

        def per_image(rows: np.ndarray) -> np.ndarray:
            return np.repeat(rows, per_prompt, axis=0)

        zero = no_negative and self.force_zeros_for_empty_prompt
        inputs = {"time_ids": np.broadcast_to(time_ids, (n * per_prompt, *time_ids.shape)).copy(),
                  "zero_negative": np.full((n * per_prompt,), zero, np.bool_)}
        if self.is_refiner:
            # diffusers pairs its one encoder with `prompt` and ignores these; we refuse them.
            for name, value in (("prompt_2", prompt_2), ("negative_prompt_2", negative_prompt_2)):
                if value is not None:
                    raise ValueError(f"{name} does not apply to a refiner (one text encoder, "
                                     "which reads prompt / negative_prompt)")
            return inputs
        if stack is not None:
            # Edited / AND prompts: the second encoder reads the same entries as the first.
            for name, value in (("prompt_2", prompt_2), ("negative_prompt_2", negative_prompt_2)):
                if value is not None:
                    raise ValueError(f"{name} cannot be given with prompt editing, alternation "
                                     "or AND in prompt / negative_prompt (both encoders read "
                                     "those)")
            (ids_2, weights_2), _ = stack.token_arrays(self._tokenize_2, chunks)
            return {**inputs, "ids_2": per_image(ids_2[:n]), "weights_2": per_image(weights_2[:n]),
                    "neg_ids_2": per_image(ids_2[n:]), "neg_weights_2": per_image(weights_2[n:])}
        prompts_2 = _texts(prompt_2, "prompt_2", n) or prompts
        # diffusers: negative_prompt_2 defaults to negative_prompt (itself "" when absent).
        negatives_2 = _texts(negative_prompt_2, "negative_prompt_2", n) or negatives
        # The second encoder's chunks, in the first's count (sdjax.prompts: each prompt's
        # chunks repeat, or are padded with the empty chunk, to fill it).
        counts_2 = prompt_syntax.prompt_chunks(prompts_2 + negatives_2, self.tokenizer_2,
                                               prompt_syntax.expander(self.store.embedding_tokens))
        if max(counts_2) > chunks:
            raise ValueError(f"prompt_2 / negative_prompt_2 are {max(counts_2)} chunks of 75 "
                             f"tokens, longer than prompt / negative_prompt ({chunks}): the "
                             "second encoder's prompts may be at most as long as the first's")
        ids_2, weights_2 = self._tokenize_2(prompts_2 + negatives_2, chunks)
        return {**inputs, "ids_2": per_image(ids_2[:n]), "weights_2": per_image(weights_2[:n]),
                "neg_ids_2": per_image(ids_2[n:]), "neg_weights_2": per_image(weights_2[n:])}

    def _tokenize_2(self, texts: list[str], chunks: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
        return prompt_syntax.prompt_arrays(
            texts, self.tokenizer_2, chunks,
            expand=prompt_syntax.expander(self.store.embedding_tokens))

    def _time_ids(self, height: int, width: int, *, original_size=None,
                  crops_coords_top_left=None, target_size=None, negative_original_size=None,
                  negative_crops_coords_top_left=None, negative_target_size=None,
                  aesthetic_score=None, negative_aesthetic_score=None) -> np.ndarray:
        """float32 (2, num_time_ids): the [negative, positive] time ids of every image, as
        diffusers' ``_get_add_time_ids`` makes them."""
        original = _pair(original_size, "original_size", (height, width))
        crops = _pair(crops_coords_top_left, "crops_coords_top_left", (0, 0))
        if self.requires_aesthetics_score:
            for name, value in (("target_size", target_size),
                                ("negative_target_size", negative_target_size)):
                if value is not None:
                    raise ValueError(f"{name} does not apply to this model: its time ids hold an "
                                     "aesthetic score in place of the target size")
            score = validation.check_number(
                AESTHETIC_SCORE if aesthetic_score is None else aesthetic_score,
                "aesthetic_score")
            negative_score = validation.check_number(
                NEGATIVE_AESTHETIC_SCORE if negative_aesthetic_score is None
                else negative_aesthetic_score, "negative_aesthetic_score")
            # diffusers' img2img: each negative size defaults on its own, the crop to (0, 0)
            # (not to crops_coords_top_left).
            neg = (_pair(negative_original_size, "negative_original_size", original)
                   + _pair(negative_crops_coords_top_left, "negative_crops_coords_top_left",
                           (0, 0)) + (negative_score,))
            return np.asarray([neg, original + crops + (score,)], np.float32)
        for name, value in (("aesthetic_score", aesthetic_score),
                            ("negative_aesthetic_score", negative_aesthetic_score)):
            if value is not None:
                raise ValueError(f"{name} does not apply to this model: its time ids hold no "
                                 "aesthetic score (refiners' do)")
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
        return np.asarray([neg, original + crops + target], np.float32)

    # ------------------------------------------------------------------ compiled part
    def _encode(self, params, ids, neg_ids, inputs, clip_skip: int,
                entries: int = 1) -> tuple[jax.Array, dict]:
        """sampling.Networks.encode for SDXL: (context, added_cond) of [negatives; prompts].
        Each encoder's chunks get the WebUI's emphasis (sdjax.prompts.emphasize); the pooled
        output is the first chunk's, as the WebUI takes it. ``entries`` > 1: each row holds
        that many prompts' chunks (sdjax.prompt_editing) and the pooled output is (rows,
        entries, width), each prompt's first chunk's."""
        if clip_skip != 1:
            raise ValueError("clip_skip does not apply to SDXL, which conditions on its text "
                             "encoders' penultimate layers")
        te = nnx.merge(self.store.graphdefs["text_encoder"], params["text_encoder"])
        ids_1, weights_1 = (jnp.concatenate(pair) for pair in zip(neg_ids, ids, strict=True))
        if self.is_refiner:
            context, pooled = _projected_states(te, ids_1, weights_1, entries)
        else:
            te2 = nnx.merge(self.store.graphdefs["text_encoder_2"], params["text_encoder_2"])
            states = prompt_syntax.emphasize(
                te.hidden_states(ids_1.reshape(-1, ids_1.shape[-1]))[-2], weights_1)
            states_2, pooled = _projected_states(
                te2, jnp.concatenate([inputs["neg_ids_2"], inputs["ids_2"]]),
                jnp.concatenate([inputs["neg_weights_2"], inputs["weights_2"]]), entries)
            context = jnp.concatenate([states, states_2.astype(states.dtype)], axis=-1)
        zero = jnp.concatenate([inputs["zero_negative"],
                                jnp.zeros_like(inputs["zero_negative"])])
        context = jnp.where(zero[:, None, None], 0, context)
        pooled = jnp.where(zero[:, None] if pooled.ndim == 2 else zero[:, None, None], 0, pooled)
        time_ids = jnp.concatenate([inputs["time_ids"][:, 0], inputs["time_ids"][:, 1]])
        return context, {"text_embeds": pooled, "time_ids": time_ids}

    # ------------------------------------------------------------------ adapters
    @property
    def lora_prefixes(self) -> Mapping[str, tuple[str, str]]:
        """LoRA files change the UNet and both text encoders (kohya's ``lora_te1_`` /
        ``lora_te2_``, diffusers' ``text_encoder.`` / ``text_encoder_2.``); a refiner's one
        encoder is SDXL's second."""
        from sdjax.weights.lora import REFINER_PREFIXES, SDXL_PREFIXES
        return REFINER_PREFIXES if self.is_refiner else SDXL_PREFIXES

    def _embedding_tables(self, path: Path, token: str | None
                          ) -> tuple[str, list[tuple[str, str, np.ndarray]]]:
        """SDXL embeddings (``clip_l`` and ``clip_g`` vectors, the WebUI's layout; the token
        defaults to the file's stem): clip_l's rows go to ``text_encoder``, clip_g's to
        ``text_encoder_2``, under the same token in both tokenizers; a refiner's one encoder
        takes clip_g. An SD1.x/SD2.x embedding raises ``ValueError``."""
        from sdjax.weights import embeddings

        if self.is_refiner:
            token, sets = embeddings.read_sdxl_embedding(path, token, ("clip_g",))
            return token, [("text_encoder", "tokenizer", sets["clip_g"])]
        token, sets = embeddings.read_sdxl_embedding(path, token)
        return token, [("text_encoder", "tokenizer", sets["clip_l"]),
                       ("text_encoder_2", "tokenizer_2", sets["clip_g"])]


def _projected_states(te, ids: jax.Array, weights: jax.Array,
                      entries: int = 1) -> tuple[jax.Array, jax.Array]:
    """(emphasised penultimate states, projected pooled output of the first chunk) of a
    CLIPTextModelWithProjection for (N, chunks, 77) token ids and weights; with ``entries``
    > 1, the pooled output (N, entries, D) of each entry's first chunk."""
    n, c, t = ids.shape
    states, pooled = te.penultimate_and_pooled(ids.reshape(n * c, t))
    if entries == 1:
        return prompt_syntax.emphasize(states, weights), pooled.reshape(n, c, -1)[:, 0]
    return (prompt_syntax.emphasize(states, weights),
            pooled.reshape(n, entries, c // entries, -1)[:, :, 0])


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
