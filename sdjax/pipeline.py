"""StableDiffusionPipeline: load a model once, then generate batches of images, each batch in
one compiled call that every device runs on its own shard.

Inside the compiled call: CLIP text encoding of the prompt and negative prompt, the whole
denoising loop (``jax.lax.fori_loop``) with classifier-free guidance as one 2B batch through the
UNet, and the VAE decode to uint8 pixels. Prompts (as token ids), seeds and guidance scales are
runtime arrays, so changing them never recompiles; size, steps, scheduler and batch shape are
static and each combination is compiled once per process (and cached on disk across processes).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdjax import model_defaults, parallel, sampling, tasks, validation
from sdjax import prompts as prompt_syntax
from sdjax.schedulers import SCHEDULER_NAMES, cut, default_scheduler_name, get_scheduler
from sdjax.schedulers.common import start_index
from sdjax.weights.diffusers_folder import load_pipeline_folder
from sdjax.weights.errors import WeightsError
from sdjax.weights.families import PREDICTION_TYPES
from sdjax.weights.resolve import resolve_model

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
CACHE_ENV = "SDJAX_COMPILATION_CACHE"
# jax.default_matmul_precision's names for float32 dots and convolutions on GPUs and TPUs:
# "highest" is true float32; "high" and "default" are XLA's faster reduced forms (TF32 on
# NVIDIA GPUs, bfloat16 passes on TPUs). CPUs compute float32 either way.
MATMUL_PRECISIONS = ("default", "high", "highest")


def parse_dtype(dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        return jnp.dtype(DTYPES[dtype])
    d = jnp.dtype(dtype)
    if d not in [jnp.dtype(v) for v in DTYPES.values()]:
        raise ValueError(f"unsupported dtype {d}")
    return d


def resolve_matmul_precision(precision: str | None, dtype: jnp.dtype) -> str | None:
    """The precision the sampler is compiled with: ``precision`` if given, else "highest" for
    a float32 pipeline (float32 means float32 on every backend) and None, XLA's own default,
    for half-precision ones, whose dots take half-precision inputs anyway."""
    if precision is not None:
        if precision not in MATMUL_PRECISIONS:
            raise ValueError(f"matmul_precision must be one of {', '.join(MATMUL_PRECISIONS)}, "
                             f"not {precision!r}")
        return precision
    return "highest" if jnp.dtype(dtype) == jnp.float32 else None


def enable_compilation_cache(path: str | None = None) -> str | None:
    """Turn on JAX's persistent compilation cache, so a second process start skips the
    compile. ``SDJAX_COMPILATION_CACHE`` moves it (a path) or turns it off (``0``/``off``).
    Returns the directory used, or None when disabled."""
    setting = path or os.environ.get(CACHE_ENV)
    if setting and setting.lower() in ("0", "off", "false", "none"):
        return None
    if not setting:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
        setting = os.path.join(base, "sdjax", "jax_cache")
    try:
        os.makedirs(setting, exist_ok=True)
    except OSError:
        return None  # a read-only home must not stop sampling; it only costs the compile
    jax.config.update("jax_compilation_cache_dir", setting)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return setting


@dataclasses.dataclass
class PipelineOutput:
    images: np.ndarray  # uint8 (N, H, W, 3); float32 or latents for other output types
    # The seed each image's noise came from: what reproduces it (seed=-1 picks a random one).
    seeds: list[int] = dataclasses.field(default_factory=list)


class NonFiniteError(ValueError):
    """The sampler produced NaN or infinite numbers (the WebUI's "A tensor with all NaNs was
    produced"): NaN weights or inputs, or a float16 overflow."""


class PendingImages:
    """A batch the devices are still computing."""

    def __init__(self, array, n: int, finish=None, seeds: Sequence[int] = ()):
        # With the NaN check on, the compiled call returns (images, one status per image).
        self._array, self._status = array if isinstance(array, tuple) else (array, None)
        self._n, self._finish, self._seeds = n, finish, [int(s) for s in seeds]

    def result(self) -> PipelineOutput:
        images = parallel.fetch(self._array)[:self._n]
        if self._status is not None:
            _raise_if_nonfinite(parallel.fetch(self._status)[:self._n])
        if self._finish is not None:  # host-side post-processing (inpainting's paste-back)
            images = self._finish(images)
        return PipelineOutput(images=images, seeds=self._seeds)


def _raise_if_nonfinite(status: np.ndarray) -> None:
    bad = np.flatnonzero(status)
    if not len(bad):
        return
    where = ("the VAE decoder" if (status[bad] == sampling.NONFINITE_PIXELS).all()
             else "the UNet")
    listed = ", ".join(str(i) for i in bad[:8]) + (" ..." if len(bad) > 8 else "")
    raise NonFiniteError(
        f"a tensor with NaN/inf values was produced in {where} for image(s) {listed} of "
        f"the batch: NaN weights or inputs, or a float16 overflow (try dtype float32 or "
        f"bfloat16); nan_check=False (--no_nan_check) keeps such images")


class StableDiffusionPipeline:
    """Text-to-image with Stable Diffusion 1.x/2.x-architecture models.

    Build it with :meth:`from_pretrained`; call it with prompts. See docs/python-api.md.
    """

    # Sampling settings of this kind of model, between a folder's sdjax.json and the library's
    # (sdjax.model_defaults.resolve).
    class_defaults: ClassVar[Mapping[str, Any]] = {}
    # Subclasses with their own conditioning (sdjax.sdxl): the model family they load, and the
    # keyword arguments of a call that go to :meth:`_conditioning_inputs`.
    SDXL = False
    CONDITIONING_ARGS: tuple[str, ...] = ()

    def __init__(self, *, text_encoder, vae, unet, tokenizer, scheduler_config: dict,
                 mesh, dtype, name: str = "", vae_scale_factor: int = 8,
                 tokenizer_dir: Path | None = None, note: str = "",
                 matmul_precision: str | None = None):
        # Weights still being read (from_pretrained(background_load=True)); see params.
        self._loading: Future | None = None
        self.tokenizer = tokenizer
        self.tokenizer_dir = tokenizer_dir  # its files, for saving; None = bundled CLIP BPE
        self.note = note  # what was loaded and how to change it (single files), for the CLI
        self.scheduler_config = scheduler_config
        self.mesh = mesh
        self.dtype = dtype
        # Fixed at construction: it is traced into every executable this pipeline compiles.
        self._matmul_precision = resolve_matmul_precision(matmul_precision, dtype)
        self.name = name
        self.vae_scale_factor = vae_scale_factor
        self.unet_config = unet.config
        self.text_encoder_config = text_encoder.config
        self.vae_config = vae.config
        self._graphdefs = {}
        self._params: dict[str, nnx.State] = {}
        for key, module in (("text_encoder", text_encoder), ("vae", vae), ("unet", unet)):
            self._graphdefs[key], self._params[key] = nnx.split(module)
        self._compiled: dict[sampling.CoreSpec, sampling.Executable] = {}
        self.compile_seconds = 0.0
        # Time callers spent blocked on background reads (see wait_for_weights), so the CLIs
        # can keep it out of their generation figures.
        self.weights_wait_seconds = 0.0
        # LoRAs: file -> (its layers, scale), and the un-merged weights they touch, so a new
        # scale re-merges exactly from the originals. Embeddings: name -> its tokens.
        self._loras: dict[str, tuple] = {}
        self._pristine: dict[tuple[str, tuple], jax.Array] = {}
        self._embedding_tokens: dict[str, list[str]] = {}
        # The model folder's sdjax.json: what a call uses where its caller gives nothing.
        self.model_defaults: dict[str, Any] = {}

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, model: str = "toy", dtype="bfloat16",
                        num_devices: int | None = None, *, config=None, vae=None,
                        prediction_type: str | None = None, ema: bool = False,
                        variant: str | None = None, compilation_cache: str | None = None,
                        local_devices: bool = False,
                        matmul_precision: str | None = None,
                        background_load: bool = False) -> StableDiffusionPipeline:
        """``model``: ``"toy"`` | a diffusers folder | a single ``.safetensors``/``.ckpt``
        (CompVis/A1111 layout) | a hub id. ``dtype``: compute/param dtype of the networks.
        ``num_devices``: devices to shard batches over (None = all).
        ``config`` (single files): None = detect the family from the tensors, a preset name
        (``sd15``, ``sd21``, ``sd21-v``, …) or a diffusers folder whose configs, tokenizer and
        scheduler to use. ``vae``: another VAE, a diffusers VAE folder or a single VAE file.
        ``prediction_type``: ``"epsilon"`` | ``"v_prediction"``, overriding the scheduler
        config (and a single file's ``.yaml``). ``ema``: single files with both trained and
        EMA UNet weights load the trained ones by default (as diffusers does), the EMA copy
        with ``ema=True``.
        ``local_devices``: on a multi-host run, use only this process's devices, so each
        process generates on its own (no collective with the other hosts).
        ``matmul_precision``: ``"highest"`` | ``"high"`` | ``"default"``, the precision of the
        sampler's dots and convolutions on GPUs and TPUs; None = ``"highest"`` for float32 (true
        float32), XLA's default for bfloat16/float16. ``"default"`` makes a float32 pipeline
        use TF32 (NVIDIA) or bfloat16 passes (TPU): faster, less exact.
        ``background_load``: return once the configs, tokenizers and every tensor's name and
        shape are read and checked, and read the tensors themselves in a background thread;
        the first call compiles meanwhile (or fetches its executable from the compilation
        cache), LoRA files are checked at once and merged after the reads, and whatever needs
        the values (calls, embeddings, saving, :attr:`params`) waits for them. A file that
        fails while being read raises there. (Multi-process runs load at once: placing
        weights on a global mesh is a collective.)"""
        dtype = parse_dtype(dtype)
        matmul_precision = resolve_matmul_precision(matmul_precision, dtype)
        if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, "
                             f"not {prediction_type!r}")
        if vae is not None and not Path(vae).expanduser().exists():
            raise WeightsError(f"VAE not found: {vae}")  # before the model's gigabytes load
        parallel.maybe_initialize_distributed()
        enable_compilation_cache(compilation_cache)
        mesh = parallel.make_mesh(num_devices, local=local_devices)
        source = resolve_model(model)
        replicated = parallel.replicated(mesh)

        def place(a):
            return jax.device_put(a, replicated)

        deferred = None
        if background_load and jax.process_count() == 1:
            from sdjax.weights.loader import DeferredPlace
            place = deferred = DeferredPlace(place, replicated)
        if source.is_file():
            from sdjax.weights.single_file import load_single_file
            parts = load_single_file(source, config=config, prediction_type=prediction_type,
                                     ema=ema, dtype=dtype, place=place, sdxl=cls.SDXL)
        else:
            if config is not None or ema:
                raise ValueError("config= and ema= are for single-file checkpoints; a "
                                 "diffusers folder brings its own configs and weights")
            parts = load_pipeline_folder(source, dtype=dtype, place=place, variant=variant,
                                         sdxl=cls.SDXL)
            if prediction_type is not None:
                parts.scheduler_config = {**parts.scheduler_config,
                                          "prediction_type": prediction_type}
        if vae is not None:
            from sdjax.weights.single_file import load_vae
            parts.vae = load_vae(vae, parts.vae.config, dtype=dtype, place=place)
            parts.note += f"{'; ' if parts.note else ''}VAE from {vae}"
        pipe = cls(text_encoder=parts.text_encoder, vae=parts.vae, unet=parts.unet,
                   tokenizer=parts.tokenizer, scheduler_config=parts.scheduler_config,
                   mesh=mesh, dtype=dtype, name=model,
                   vae_scale_factor=parts.vae.config.downsample_factor,
                   tokenizer_dir=parts.tokenizer_dir, note=parts.note,
                   matmul_precision=matmul_precision, **parts.extra)
        if source.is_dir():
            pipe.model_defaults = model_defaults.read(source)
        if deferred is not None:
            pipe._fill_in_background(deferred)
        return pipe

    def _fill_in_background(self, deferred) -> None:
        # Only this pipeline's variables: a network replaced after loading (vae=) is not read.
        wanted = [var for state in self._params.values()
                  for _, var in nnx.to_flat_state(state)]
        self._load_in_background(lambda: deferred.fill(wanted))

    def _load_in_background(self, work: Callable[[], None]) -> None:
        pool = ThreadPoolExecutor(1, thread_name_prefix="sdjax-load")
        self._loading = pool.submit(work)
        pool.shutdown(wait=False)

    def _after_weights(self, step: Callable[[], None]) -> None:
        """Run ``step`` (which changes the weights) once they are read: now, or after the
        background reads in their thread, so that calls still compile meanwhile."""
        loading = self._loading
        if loading is None or loading.done():
            self.wait_for_weights()  # raises what the reads raised
            step()
            return

        def then() -> None:
            loading.result()
            step()

        self._load_in_background(then)

    def wait_for_weights(self) -> None:
        """Return once the weights are read (at once unless from_pretrained's
        ``background_load`` is still reading them); raises what reading them raised."""
        loading = self._loading
        if loading is not None:
            t0 = time.perf_counter()
            try:
                loading.result()
            finally:
                self.weights_wait_seconds += time.perf_counter() - t0
            self._loading = None

    @property
    def params(self) -> dict[str, nnx.State]:
        """The networks' parameters (``{"text_encoder": State, "vae": …, "unet": …}``), once
        they are read (:meth:`wait_for_weights`)."""
        self.wait_for_weights()
        return self._params

    @params.setter
    def params(self, value: dict[str, nnx.State]) -> None:
        self.wait_for_weights()
        self._params = value

    # ------------------------------------------------------------------ adapters
    def load_lora(self, path: str | Path, scale: float = 1.0) -> str:
        """Merge a LoRA file (kohya/A1111 or diffusers/PEFT ``.safetensors``) into the UNet and
        text encoder weights at ``scale``; returns its name (the file's stem). Several stack;
        loading the same file again changes its scale, re-merged from the original weights.
        Shapes do not change, so nothing recompiles. A file that does not fit this model
        raises ``ValueError`` and leaves the pipeline as it was."""
        key = _lora_key(path)
        self.set_loras({**self.loras, key: scale})
        return self._loras[key][0].name

    def unload_lora(self, path: str | Path) -> None:
        """Take a LoRA loaded by :meth:`load_lora` out of the weights (the others stay merged,
        re-merged from the original weights); a file not loaded is a no-op."""
        key = _lora_key(path)
        if key in self._loras:
            self.set_loras({k: s for k, s in self.loras.items() if k != key})

    def set_loras(self, wanted: Mapping[str | Path, float]) -> None:
        """Make exactly ``wanted`` ({LoRA file: scale}) the merged LoRAs, in one re-merge from
        the original weights; files already loaded are not read again, and an unchanged set
        changes nothing. A file that does not fit raises ``ValueError`` and leaves the
        pipeline as it was. While the weights still load in the background, the files are
        read and checked now and merged after the weights, in the loading thread."""
        from sdjax.weights.lora import merge_loras, read_lora, restore_pristine

        wanted = {_lora_key(path): validation.check_number(scale, "scale")
                  for path, scale in wanted.items()}
        if wanted == self.loras:
            return
        networks = None  # for the shapes a new file is checked against
        loras = {}
        for key, scale in wanted.items():
            if key in self._loras:
                lora = self._loras[key][0]
            else:
                # Checked against the shapes only: the weights may still be loading.
                networks = networks or {net: nnx.merge(self._graphdefs[net], self._params[net])
                                        for net in self.lora_prefixes}
                lora = read_lora(Path(key), networks, self.lora_prefixes)
            loras[key] = (lora, scale)

        def merge() -> None:
            self._params, self._pristine = merge_loras(
                restore_pristine(self._params, self._pristine), {}, loras.values(),
                self._place)

        self._after_weights(merge)
        self._loras = loras

    @property
    def loras(self) -> dict[str, float]:
        """The LoRA files merged into the weights (resolved paths) and their scales."""
        return {key: scale for key, (_, scale) in self._loras.items()}

    @property
    def lora_prefixes(self) -> Mapping[str, tuple[str, str]]:
        """The networks a LoRA file may change and the prefixes that name them
        (:mod:`sdjax.weights.lora`): SD's UNet and text encoder."""
        from sdjax.weights.lora import SD_PREFIXES
        return SD_PREFIXES

    def load_textual_inversion(self, path: str | Path, token: str | None = None) -> str:
        """Add a textual-inversion embedding (A1111 ``.pt``/``.safetensors``, diffusers'
        ``learned_embeds``) as ``token`` (default: the WebUI file's stem, or the token a
        diffusers file holds); returns the token, which prompts then use by name. The token
        table grows, so the next call compiles once for the new size. A file that does not
        fit raises ``ValueError`` and leaves the pipeline as it was. (SDXL: see
        StableDiffusionXLPipeline._embedding_tables.)"""
        if token is not None and not isinstance(token, str):
            raise TypeError(f"token must be a string, got {type(token).__name__}")
        token, tables = self._embedding_tables(Path(path).expanduser(), token)
        return self._add_tokens(token, tables, str(path))

    def _embedding_tables(self, path: Path, token: str | None
                          ) -> tuple[str, list[tuple[str, str, np.ndarray]]]:
        """(token, [(text encoder, its tokenizer's attribute, vectors)]) of an embedding
        file: SD's one encoder takes the file's one vector set."""
        from sdjax.weights import embeddings
        token, vectors = embeddings.read_embedding(path, token)
        return token, [("text_encoder", "tokenizer", vectors)]

    def _add_tokens(self, token: str, tables: Sequence[tuple[str, str, np.ndarray]],
                    source: str) -> str:
        """Add ``token``'s vectors to each (text encoder, its tokenizer's attribute, vectors)
        of ``tables``: all checked before any is changed."""
        from sdjax.weights import embeddings

        grown = []
        for net, attr, vectors in tables:
            te = self.network(net)
            tokenizer, table = embeddings.add_embedding(
                getattr(self, attr), embeddings.token_table(te), token, vectors, source=source)
            grown.append((net, attr, te, tokenizer, table))
        for net, attr, te, tokenizer, table in grown:
            embeddings.set_token_table(te, table, self._place)
            self._graphdefs[net], self.params[net] = nnx.split(te)
            setattr(self, attr, tokenizer)
        self._compiled.clear()  # compiled for the old table size
        self._embedding_tokens[token] = embeddings.token_names(token, tables[0][2].shape[0])
        return token

    def _place(self, array) -> jax.Array:
        """Where parameters live: replicated on every device of the mesh."""
        return jax.device_put(array, parallel.replicated(self.mesh))

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, folder: str | Path) -> Path:
        """A diffusers folder (float32) that diffusers' and sdjax's from_pretrained load."""
        from sdjax.weights.export import save_pipeline
        folder = save_pipeline(folder, unet=self.network("unet"), vae=self.network("vae"),
                               text_encoder=self.network("text_encoder"),
                               tokenizer_dir=self.tokenizer_dir, tokenizer=self.tokenizer,
                               scheduler_config=self.scheduler_config)
        model_defaults.write(folder, self.model_defaults)
        return folder

    def save_single_file(self, path: str | Path, half: bool = False) -> Path:
        """A CompVis/A1111-layout ``.safetensors`` (float16 with ``half``) that the WebUI and
        diffusers' ``from_single_file`` load; written atomically. LoRAs are saved merged;
        textual-inversion tokens cannot be (the layout has no tokenizer), so they are refused."""
        if self._embedding_tokens:
            raise ValueError(f"embeddings ({', '.join(self._embedding_tokens)}) cannot be saved "
                             "in a single file; use save_pretrained, or save without them")
        from sdjax.weights.export import save_single_file
        return save_single_file(path, unet=self.network("unet"), vae=self.network("vae"),
                                text_encoder=self.network("text_encoder"), half=half)

    # ------------------------------------------------------------------ properties
    @property
    def num_devices(self) -> int:
        return self.mesh.size

    @property
    def default_hw(self) -> tuple[int, int]:
        """(height, width) the model was trained at: the UNet's sample size in pixels."""
        size = self.unet_config.sample_size
        if size is None:
            return (512, 512)
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (h * self.vae_scale_factor, w * self.vae_scale_factor)

    @property
    def matmul_precision(self) -> str | None:
        """The ``jax.default_matmul_precision`` the sampler is compiled under (None: XLA's
        default); set by ``from_pretrained(matmul_precision=...)``."""
        return self._matmul_precision

    @property
    def default_scheduler(self) -> str:
        """The scheduler a call without ``scheduler=`` uses: the model's sdjax.json, else its
        scheduler config's class."""
        return (self.sampling_settings()["scheduler"]
                or default_scheduler_name(self.scheduler_config))

    def sampling_settings(self, **given: Any) -> dict[str, Any]:
        """The settings a call with these arguments uses (None or absent = not given): each
        of sdjax.model_defaults.LIBRARY_DEFAULTS from the arguments, else the model's
        sdjax.json, else the class's defaults, else the library's."""
        return model_defaults.resolve(given, self.model_defaults, self.class_defaults)

    @property
    def max_prompt_tokens(self) -> int:
        return self.tokenizer.model_max_length

    @property
    def compile_count(self) -> int:
        """Sampler executables this pipeline has compiled: one per static shape (size, steps,
        scheduler, batch), never more for new prompts, seeds or guidance scales."""
        return sum(fn.is_compiled for fn in self._compiled.values())

    def network(self, name: str) -> nnx.Module:
        """``"text_encoder"``, ``"unet"`` or ``"vae"`` as an NNX module over this pipeline's
        parameters, for tools that run or analyse one network alone."""
        return nnx.merge(self._graphdefs[name], self.params[name])

    # ------------------------------------------------------------------ host side
    def tokenize(self, prompts: Sequence[str],
                 chunks: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(token ids int32, weights float32), each (len(prompts), chunks, 77): the prompts in
        the WebUI's syntax and 75-token chunks (``sdjax.prompts``), every prompt's chunks
        repeated to ``chunks`` (default: the bucket these prompts need)."""
        return prompt_syntax.prompt_arrays(prompts, self.tokenizer, chunks,
                                           prompt_syntax.expander(self._embedding_tokens))

    def check_size(self, height: int, width: int) -> None:
        for name, v in (("height", height), ("width", width)):
            validation.check_size(v, name, self.vae_scale_factor)

    def __call__(self, *args, **kwargs) -> PipelineOutput:
        """Generate images; the arguments are those of :meth:`submit`."""
        return self.submit(*args, **kwargs).result()

    def submit(self, *args, **kwargs) -> PendingImages:
        """``submit(prompt, negative_prompt=None, num_inference_steps=None,
        guidance_scale=None, height=None, width=None, num_images_per_prompt=1, seed=0,
        latents=None, scheduler=None, *, image=None, mask_image=None, strength=None,
        seeds=None, image_indices=None, batch_size_per_device=None, decode_chunk=None,
        output_type="uint8", nan_check=True, guidance_rescale=None,
        guidance_interval=None, clip_skip=None, denoising_start=None,
        denoising_end=None)`` (see :meth:`_prepare` for the
        types).

        Prompts use the WebUI's syntax (``(word:1.3)``, ``[word]``, ``BREAK``; see
        docs/python-api.md) and may be longer than 75 tokens. ``clip_skip`` (the WebUI's "Clip
        skip", None = 1) takes the text encoder's hidden state ``clip_skip - 1`` layers before
        the last; it is part of the compiled shape.

        ``num_inference_steps``, ``guidance_scale``, ``scheduler``, ``guidance_rescale`` and
        ``guidance_interval`` left at None take the model folder's ``sdjax.json`` values, else
        the pipeline class's (the upscaler's 75 steps and guidance 9), else the library's (50
        steps, guidance 7.5, the model's scheduler config, no rescale, no interval):
        :meth:`sampling_settings` says which. A guidance scale <= 1 means no guidance, as in
        diffusers; when no image of the call is guided the UNet runs on the
        conditional batch alone. ``guidance_rescale`` (in [0, 1]) is diffusers' CFG rescale;
        ``guidance_interval=(sigma_lo, sigma_hi)`` guides only the steps whose noise level
        sigma (``sqrt((1 - alphas_cumprod) / alphas_cumprod)`` at the step's timestep) lies
        in it, and uses guidance 1 elsewhere. Each takes one value for all images or one per
        image, and none of them recompiles.

        Start generating ``len(prompt) * num_images_per_prompt`` images and return at once
        (JAX dispatches asynchronously); ``.result()`` waits and brings them to the host.
        Submitting the next batch before taking this one's result keeps the devices busy
        while the host encodes and writes.

        Image ``i`` of the call (prompt ``i // num_images_per_prompt``) starts from noise drawn
        from a key derived only from ``(seed, i)``, so results do not depend on the device
        count or batch size. ``seeds``/``image_indices`` (one per image) override that pair
        per image, for tools that generate one dataset over many calls. ``seed=-1`` picks a
        random seed (as the WebUI does); the output's ``seeds`` say which seed each image
        used. Wrong argument types raise ``TypeError`` and wrong values ``ValueError``,
        naming the argument, before anything compiles.
        ``batch_size_per_device`` fixes the compiled batch shape (default: just enough);
        ``decode_chunk`` caps how many images each device decodes at once.
        ``output_type="float"`` returns float32 pixels in [0, 1] instead of uint8 (diffusers'
        ``output_type="np"``), ``"latent"`` the final latents (NHWC, unscaled by the VAE).

        ``image`` (PIL image, uint8 (H, W, 3) array, or a list / (N, H, W, 3) array: one for
        all images, one per prompt or one per image) turns the call into img2img, and with
        ``mask_image`` (white = repaint) into inpainting; ``strength`` (0, 1] is the share of
        the schedule that runs (default 0.8 for img2img, 1.0 for inpainting), a runtime input:
        changing it does not recompile. ``latents`` is then the noise mixed into the image.
        ``image`` may also be latents (float (h, w, C) or (N, h, w, C), as ``output_type=
        "latent"`` returns them; diffusers takes them the same way), used without the VAE
        encode. ``denoising_end`` (0-1) stops the schedule where its timesteps pass that
        fraction of the training timesteps, and ``denoising_start`` (img2img, in place of
        ``strength``) starts there from ``image`` as it is, without adding noise: diffusers'
        base→refiner hand-off (``output_type="latent"`` with ``denoising_end=0.8`` on the
        base, the latents as ``image=`` with ``denoising_start=0.8`` on the refiner). Both
        are runtime inputs; ``denoising_end`` compiles once per shape for the early stop.
        ``nan_check`` (default on) fails with :class:`NonFiniteError` instead of returning
        images from NaN/inf latents or pixels.
        """
        fn, call_args, n, finish, seeds = self._prepare(*args, **kwargs)
        if self._loading is not None:
            if not self._loading.done():
                # Weights still loading in the background: compile (or fetch from the cache)
                # against their shapes meanwhile.
                fn.compile(*call_args)
            self.wait_for_weights()
            # The parameters as they are now: read, and with any pending LoRA merge done.
            call_args = (self._params, *call_args[1:])
        return PendingImages(fn(*call_args), n, finish, seeds)

    def compile(self, *args, **kwargs) -> jax.stages.Compiled:
        """The compiled sampler that :meth:`submit` with the same arguments runs, compiled now
        if this process has not yet (the time counts in ``compile_seconds``); nothing runs.
        For tools: XLA's ``cost_analysis()`` and ``memory_analysis()`` of the whole call, or
        checking that a batch fits before running it."""
        fn, call_args, *_ = self._prepare(*args, **kwargs)
        return fn.compile(*call_args)

    def lower(self, *args, **kwargs) -> jax.stages.Lowered:
        """The sampler that :meth:`submit` with the same arguments runs, traced and lowered but
        not compiled: its StableHLO (``as_text()``) as XLA receives it, in seconds."""
        fn, call_args, *_ = self._prepare(*args, **kwargs)
        return fn.lower(*call_args)

    def _prepare(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None
                 = None, num_inference_steps: int | None = None,
                 guidance_scale: float | Sequence[float] | None = None,
                 height: int | None = None, width: int | None = None,
                 num_images_per_prompt: int = 1, seed: int = 0, latents=None,
                 scheduler: str | None = None, *, image=None, mask_image=None,
                 strength: float | None = None, seeds: Sequence[int] | None = None,
                 image_indices: Sequence[int] | None = None,
                 batch_size_per_device: int | None = None,
                 decode_chunk: int | None = None, output_type: str = "uint8",
                 nan_check: bool = True,
                 guidance_rescale: float | Sequence[float] | None = None,
                 guidance_interval: tuple[float, float] | Sequence | None = None,
                 clip_skip: int | None = None, denoising_start: float | None = None,
                 denoising_end: float | None = None, **task_kwargs):
        """Validate and place the arguments of :meth:`submit`; returns (executable, its
        arguments, image count, host post-processing of the images or None, the seed of each
        image)."""
        if output_type not in ("uint8", "float", "latent"):
            raise ValueError(f"output_type must be 'uint8', 'float' or 'latent', not "
                             f"{output_type!r}")
        settings = self.sampling_settings(
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            scheduler=scheduler, guidance_rescale=guidance_rescale,
            guidance_interval=guidance_interval, clip_skip=clip_skip)
        num_inference_steps, guidance_scale = (settings["num_inference_steps"],
                                               settings["guidance_scale"])
        scheduler = settings["scheduler"]
        prompts, negatives, seeds, guidance = validation.check_call(
            prompt=prompt, negative_prompt=negative_prompt,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            height=height, width=width, num_images_per_prompt=num_images_per_prompt, seed=seed,
            seeds=seeds, image_indices=image_indices, scheduler=scheduler,
            scheduler_names=SCHEDULER_NAMES, factor=self.vae_scale_factor)
        sched = get_scheduler(scheduler or default_scheduler_name(self.scheduler_config),
                              self.scheduler_config)
        clip_skip = validation.check_int(
            1 if settings["clip_skip"] is None else settings["clip_skip"], "clip_skip", minimum=1,
            maximum=self.text_encoder_config.num_hidden_layers)
        n = len(prompts) * num_images_per_prompt
        guidance, cfg = self._guidance(guidance, settings["guidance_rescale"],
                                       settings["guidance_interval"], n)
        conditioning = {k: task_kwargs.pop(k) for k in self.CONDITIONING_ARGS if k in task_kwargs}
        if denoising_start is not None:
            denoising_start = cut.check_fraction(denoising_start, "denoising_start")
            if image is None or mask_image is not None:
                raise ValueError("denoising_start is img2img's: pass image= (latents from a "
                                 "denoising_end call, or an image) and no mask_image")
            if strength is not None:
                raise ValueError("strength and denoising_start both say where img2img starts: "
                                 "give one")
            if latents is not None:
                raise ValueError("with denoising_start no noise is added to the image, so "
                                 "latents= (that noise) does not apply; pass the latents to "
                                 "start from as image=")
            strength = 1.0  # a start _task_inputs always accepts; denoising_start moves it
        task, inputs, start, (height, width), finish = self._task_inputs(
            image, mask_image, strength, len(prompts), num_images_per_prompt,
            int(num_inference_steps), height, width, **task_kwargs)
        if denoising_start is not None:
            # diffusers' hand-off: the image is the latents another model stopped at (its
            # denoising_end), already noisy; the run starts at the step where that one ended.
            start = cut.denoising_start_step(sched, int(num_inference_steps), denoising_start)
            task = dataclasses.replace(task, noised_start=False)
        stop = 0  # unused unless the spec stops early
        if denoising_end is not None:
            denoising_end = cut.check_fraction(denoising_end, "denoising_end")
            if denoising_start is not None and denoising_start >= denoising_end:
                raise ValueError(f"denoising_start ({denoising_start:g}) must be below "
                                 f"denoising_end ({denoising_end:g})")
            stop = cut.denoising_end_stop(sched, int(num_inference_steps), start,
                                          denoising_end)
        if finish is not None and output_type != "uint8":
            raise ValueError("padding_mask_crop pastes uint8 images back: output_type must be "
                             "'uint8'")
        self.check_size(height, width)
        # One chunk count for prompts and negative prompts alike (sdjax.prompts).
        text = self.tokenize(prompts + negatives)
        inputs.update(self._conditioning_inputs(prompts, negatives, num_images_per_prompt,
                                                height, width, negative_prompt is None,
                                                chunks=text[0].shape[1], **conditioning))
        text = tuple(np.repeat(a, num_images_per_prompt, axis=0) for a in text)

        if seeds is None:
            seeds = [parallel.random_seed(seed)] * n
        if image_indices is None:
            image_indices = range(n)
        lat_shape = self.latent_shape(height, width)
        if latents is not None:
            inputs["latents"] = validation.check_latents(latents, (n, *lat_shape))

        size = parallel.padded_size(n, self.mesh)
        if batch_size_per_device is not None:
            if batch_size_per_device * self.num_devices < n:
                raise ValueError(f"{n} images do not fit a batch of {batch_size_per_device} "
                                 f"per device on {self.num_devices} device(s)")
            size = batch_size_per_device * self.num_devices
        per_device = size // self.num_devices
        if decode_chunk is None:
            # The VAE decoder's full-resolution activations dwarf the UNet's per image; decode
            # about four 512x512 images' worth at a time so the UNet sets the batch limit.
            decode_chunk = 4 * 512 * 512 // (height * width)
        chunk = max(1, min(decode_chunk, per_device))
        spec = sampling.CoreSpec(lat_shape, sched, int(num_inference_steps), per_device, chunk,
                                 output_type, task, tuple(sorted(inputs)), bool(nan_check),
                                 cfg=cfg, clip_skip=clip_skip, text_chunks=text[0].shape[1],
                                 stops_early=denoising_end is not None)

        def pad(x):
            return parallel.put_batch(parallel.pad_batch(np.asarray(x), size), self.mesh)

        ids = tuple(pad(a[:n]) for a in text)  # text rows: [prompts; negatives], per image
        neg_ids = tuple(pad(a[n:]) for a in text)
        seed_arr = pad(np.asarray(seeds, np.int64).astype(np.uint32))
        index_arr = pad(np.asarray(image_indices, np.int64).astype(np.uint32))
        guidance = pad(guidance)
        # Built per shard like the batch, so multi-host runs never put to another host's device.
        span = jax.make_array_from_callback((2,), parallel.replicated(self.mesh),
                                            lambda idx: np.asarray([start, stop], np.int32)[idx])
        placed = {k: pad(v) for k, v in inputs.items()}
        return (self._executable(spec),
                (self._params, ids, neg_ids, guidance, seed_arr, index_arr, span, placed), n,
                finish, list(seeds))

    @staticmethod
    def _guidance(scale: np.ndarray, rescale, interval, n: int) -> tuple[np.ndarray, bool]:
        """(the (n, 4) guidance array of sampling.GUIDANCE_COLUMNS, whether the unconditional
        pass runs). It runs when any image is guided (scale > 1). Guidance exactly 1 equals
        the conditional prediction either way, though not bitwise: an image at guidance <= 1
        batched with guided ones gets uncond + 1 * (cond - uncond)."""
        rescale = validation.check_guidance_rescale(rescale, n)
        bounds = validation.check_guidance_interval(interval, n)
        if bounds is None:
            bounds = np.tile(np.array([[0.0, np.inf]], np.float32), (n, 1))
        return (np.concatenate([scale[:, None], rescale[:, None], bounds], axis=1),
                bool((scale > 1).any()))
    def _conditioning_inputs(self, prompts: list[str], negatives: list[str], per_prompt: int,
                             height: int, width: int, no_negative: bool, chunks: int) -> dict:
        """Batched inputs (one row per image) that the conditioning needs besides the token
        ids; none for SD 1.x/2.x (see sdjax.sdxl)."""
        return {}

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(h, w, channels) of the latents the UNet denoises for an image of this size."""
        f = self.vae_scale_factor
        return (height // f, width // f, self.vae_config.latent_channels)

    def _task_inputs(self, image, mask_image, strength, n_prompts: int, per_prompt: int,
                     steps: int, height: int | None, width: int | None, *,
                     mask_blur: float = 0, padding_mask_crop: int | None = None,
                     masked_content: str = "original"):
        """(task, host arrays, start step, (height, width), post-processing or None) for
        text-to-image, img2img or inpainting, from the user's images.

        ``mask_blur`` (pixels) softens the mask before it is binarised and, with
        ``padding_mask_crop``, is the feathered edge of the paste-back. ``padding_mask_crop``
        is the WebUI's "only masked" inpainting: the mask's bounding box plus this many
        pixels is generated at the full ``height`` x ``width`` and pasted back.
        ``masked_content`` is the WebUI's (``tasks.MASKED_CONTENT``): what the masked region
        starts from; diffusers' "original" by default."""
        if image is None:
            if mask_image is not None:
                raise ValueError("mask_image needs an image to inpaint")
            if strength is not None:
                raise ValueError("strength needs an image (img2img or inpainting)")
            if self.unet_config.in_channels != self.vae_config.latent_channels:
                raise ValueError(f"this UNet takes {self.unet_config.in_channels} input "
                                 "channels: it is an inpainting model; pass image= and "
                                 "mask_image=")
            height = self.default_hw[0] if height is None else height
            width = self.default_hw[1] if width is None else width
            return tasks.TXT2IMG, {}, 0, (height, width), None
        if mask_image is None and self.unet_config.in_channels != \
                self.vae_config.latent_channels:
            raise ValueError("this is an inpainting model: pass mask_image= with image=")
        if mask_image is None and padding_mask_crop is not None:
            raise ValueError("padding_mask_crop needs a mask_image")
        if masked_content not in tasks.MASKED_CONTENT or (
                mask_image is None and masked_content != "original"):
            raise ValueError(f"masked_content must be one of {', '.join(tasks.MASKED_CONTENT)} "
                             f"with a mask_image, got {masked_content!r}")
        strength = (1.0 if mask_image is not None else 0.8) if strength is None else strength
        if isinstance(strength, bool) or not isinstance(strength, (int, float, np.floating)) \
                or not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be a number in (0, 1], got {strength!r}")
        start = start_index(steps, float(strength))
        latents = tasks.as_latents(image, self.vae_config.latent_channels)
        if latents is not None:
            if mask_image is not None:
                raise ValueError("inpainting needs an image, not latents, with mask_image")
            height, width = self._latent_image_size(latents[0], height, width)
            inputs = {"image": np.stack(tasks.per_image(latents, n_prompts, per_prompt,
                                                        "image"))}
            return tasks.IMG2IMG_LATENTS, inputs, start, (height, width), None
        rgb = [tasks.to_rgb(x)[0] for x in tasks.as_list(image)]
        rgb = tasks.per_image(rgb, n_prompts, per_prompt, "image")
        default = tasks.default_size(rgb[0], self.vae_scale_factor)
        height = default[0] if height is None else height
        width = default[1] if width is None else width
        self.check_size(height, width)
        if mask_image is None:
            inputs = {"image": np.stack([tasks.resize(x, height, width) for x in rgb])}
            return tasks.IMG2IMG, inputs, start, (height, width), None
        grays = [tasks.to_gray(m) for m in tasks.as_list(mask_image)]
        grays = tasks.per_image(grays, n_prompts, per_prompt, "mask")
        if mask_blur:
            grays = [np.round(tasks.blur_mask(g, mask_blur) * 255).astype(np.uint8)
                     for g in grays]
        finish = None
        if padding_mask_crop is not None:
            finish, rgb, grays = self._only_masked(rgb, grays, padding_mask_crop, height,
                                                   width)
        images = [tasks.resize(x, height, width) for x in rgb]
        if masked_content != "original":  # the WebUI fills for every other choice
            images = [tasks.fill_masked(x, tasks.resize(g, height, width))
                      for x, g in zip(images, grays, strict=True)]
        inputs = {"image": np.stack(images),
                  "mask": np.stack([tasks.binarize(g, height, width) for g in grays])}
        task = tasks.inpainting(self.unet_config.in_channels, self.vae_config.latent_channels,
                                masked_content)
        return task, inputs, start, (height, width), finish

    def _latent_image_size(self, latents: np.ndarray, height: int | None,
                           width: int | None) -> tuple[int, int]:
        """The (height, width) of the images that latents given as ``image`` make; a height or
        width given too must agree (latents are not resized)."""
        f = self.vae_scale_factor
        size = (latents.shape[0] * f, latents.shape[1] * f)
        if (height or size[0], width or size[1]) != size:
            raise ValueError(f"latents of {latents.shape[0]}x{latents.shape[1]} make "
                             f"{size[0]}x{size[1]} images (height x width): leave height and "
                             "width out or give those")
        return size

    @staticmethod
    def _only_masked(rgb, grays, padding, height, width):
        """Crop each image and (already blurred) mask to its region; the paste-back that
        undoes it through the mask."""
        if isinstance(padding, bool) or not isinstance(padding, (int, np.integer)) \
                or padding < 0:
            raise ValueError(f"padding_mask_crop must be an integer >= 0, got {padding!r}")
        if any(x.shape[:2] != rgb[0].shape[:2] or g.shape != x.shape[:2]
               for x, g in zip(rgb, grays, strict=True)):
            raise ValueError("padding_mask_crop needs every image and mask at one size")
        boxes = [tasks.only_masked_box(g, padding, height, width) for g in grays]
        alphas = np.stack([tasks.blur_mask(g, 0) for g in grays])
        finish = tasks.OnlyMasked(np.stack(rgb), alphas, boxes).paste
        rgb = [x[t:b, l:r] for x, (t, l, b, r) in zip(rgb, boxes, strict=True)]
        grays = [g[t:b, l:r] for g, (t, l, b, r) in zip(grays, boxes, strict=True)]
        return finish, rgb, grays

    # ------------------------------------------------------------------ compiled part
    def _executable(self, spec: sampling.CoreSpec) -> sampling.Executable:
        fn = self._compiled.get(spec)
        if fn is None:
            nets = sampling.Networks(self._graphdefs, self.dtype,
                                     self.vae_config.scaling_factor, self._encode)
            t0 = time.perf_counter()  # host-side tables (every start's schedule) count too
            fn = sampling.build(spec, nets, self.mesh, on_compile=self._count_compile,
                                precision=self.matmul_precision)
            self._count_compile(time.perf_counter() - t0)
            self._compiled[spec] = fn
        return fn

    # The conditioning of sampling.Networks.encode; None: one text encoder's last states.
    _encode = None

    def _count_compile(self, seconds: float) -> None:
        self.compile_seconds += seconds


def _lora_key(path: str | Path) -> str:
    """How the pipeline names a loaded LoRA file: its resolved path."""
    return str(Path(path).expanduser().resolve())


def _is_sdxl_file(path: Path) -> bool:
    """Whether a single file is an SDXL checkpoint (from its tensor names); a file that cannot
    be read is left to from_pretrained, which says why."""
    from sdjax.weights.families import sdxl_kind
    from sdjax.weights.files import open_tensor_file
    try:
        return sdxl_kind(open_tensor_file(path)) is not None
    except WeightsError:
        return False


def pipeline_class(model: str) -> type[StableDiffusionPipeline]:
    """The pipeline that loads ``model`` (what the CLIs and the server use): SDXL folders
    (``text_encoder_2`` in model_index.json) and SDXL single files (``conditioner.embedders``
    text encoders) take StableDiffusionXLPipeline."""
    from sdjax.weights.diffusers_folder import is_sdxl_index
    from sdjax.weights.files import read_json

    source = resolve_model(model)
    index = source / "model_index.json"
    if (index.is_file() and is_sdxl_index(read_json(index))) or (
            source.is_file() and _is_sdxl_file(source)):
        from sdjax.sdxl import StableDiffusionXLPipeline
        return StableDiffusionXLPipeline
    return StableDiffusionPipeline


__all__ = ["StableDiffusionPipeline", "PipelineOutput", "PendingImages", "NonFiniteError",
           "SCHEDULER_NAMES", "MATMUL_PRECISIONS", "parse_dtype", "pipeline_class"]
