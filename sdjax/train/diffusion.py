"""task="unet": the latent-diffusion objective. Images go through the frozen VAE encoder to
latents, get noise at a random training timestep, and the UNet, conditioned on the text
encoder's states through cross-attention, learns to predict the noise (or the velocity)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdjax.schedulers import Scheduler, default_scheduler_name, get_scheduler
from sdjax.train import components
from sdjax.train.components import Network, Params, Tokenizer
from sdjax.train.config import TrainConfig
from sdjax.train.data import Prepare, to_unit_range
from sdjax.train.task import Metrics, Setup, remat
from sdjax.weights import export
from sdjax.weights.files import read_json


class Compose(Protocol):
    """How an adapter task builds the networks from its trained and frozen weights (hashable:
    part of the step's static description)."""
    def __call__(self, params: dict[str, Params], frozen: dict[str, Params]
                 ) -> dict[str, Params]: ...


@dataclasses.dataclass(frozen=True)
class DiffusionTask:
    unet: nnx.GraphDef
    vae: nnx.GraphDef
    text_encoder: nnx.GraphDef
    scheduler: Scheduler
    prediction_type: str
    min_snr_gamma: float | None
    scaling_factor: float
    dtype: str
    remat_policy: str | None
    # None: the trained networks are ``params`` themselves; adapter tasks (textual inversion,
    # LoRA) train something smaller and build the networks from it inside the loss.
    compose: Compose | None = None
    # task="controlnet": the ControlNet whose residuals (from ``batch["control"]``) the UNet
    # takes; its weights are ``nets["controlnet"]``.
    controlnet: nnx.GraphDef | None = None

    def loss(self, params, frozen, batch, key) -> tuple[jax.Array, Metrics]:
        if self.compose is None:
            nets = {**frozen, **components.cast(params, jnp.dtype(self.dtype))}
        else:
            nets = self.compose(components.cast(params, jnp.dtype(self.dtype)), frozen)
        vae = nnx.merge(self.vae, nets["vae"])
        k_latent, k_noise, k_t = jax.random.split(key, 3)
        mean, logvar = vae.encode(batch["pixels"].astype(self.dtype))
        mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
        latents = mean + jnp.exp(0.5 * logvar) * jax.random.normal(k_latent, mean.shape)
        latents = jax.lax.stop_gradient(latents * self.scaling_factor)
        b = latents.shape[0]
        noise = jax.random.normal(k_noise, latents.shape)
        t = jax.random.randint(k_t, (b,), 0, self.scheduler.num_train_timesteps)
        noisy = self.scheduler.add_noise(latents, noise, t)

        def forward(unet_params, te_params, cn_params, noisy, t, ids, control):
            context = nnx.merge(self.text_encoder, te_params)(ids)
            residuals = {}
            if self.controlnet is not None:
                down, mid = nnx.merge(self.controlnet, cn_params)(noisy, t, context, control)
                residuals = {"down_residuals": down, "mid_residual": mid}
            return nnx.merge(self.unet, unet_params)(noisy, t, context, **residuals)

        pred = remat(forward, self.remat_policy)(
            nets["unet"], nets["text_encoder"], nets.get("controlnet"), noisy, t,
            batch["input_ids"], batch.get("control")).astype(jnp.float32)
        target = (noise if self.prediction_type == "epsilon"
                  else self.scheduler.get_velocity(latents, noise, t))
        per_sample = jnp.mean(jnp.square(pred - target), axis=(1, 2, 3))
        mse = jnp.mean(per_sample)
        if self.min_snr_gamma is None:
            return mse, {"mse": mse}
        # Min-SNR-gamma: clamp each timestep's weight at gamma so the easy, low-noise
        # timesteps stop dominating; expressed for the chosen target (Hang et al. 2023).
        snr = self.scheduler.snr(t)
        clamped = jnp.minimum(snr, self.min_snr_gamma)
        weight = clamped / snr if self.prediction_type == "epsilon" else clamped / (snr + 1)
        return jnp.mean(per_sample * weight), {"mse": mse}


def scheduler_config(cfg: TrainConfig) -> dict:
    """The recipe's scheduler config (else the pretrained one's), with the recipe's
    prediction type written in, since the export must tell samplers what the UNet predicts."""
    d = cfg.diffusion
    if d.scheduler is not None:
        conf = dict(d.scheduler)
    else:
        folder = components.pretrained_folder(cfg)
        if folder is None:
            raise ValueError("task 'unet' needs diffusion.scheduler or a pretrained folder")
        conf = read_json(folder / "scheduler" / "scheduler_config.json")
    conf["prediction_type"] = d.prediction_type or conf.get("prediction_type", "epsilon")
    if conf["prediction_type"] not in ("epsilon", "v_prediction"):
        raise ValueError("diffusion.prediction_type must be 'epsilon' or 'v_prediction'")
    return conf


def setup(cfg: TrainConfig, place) -> Setup:
    sched_conf = scheduler_config(cfg)
    sched = get_scheduler(default_scheduler_name(sched_conf), sched_conf)
    tok = components.tokenizer(cfg)
    train_te = cfg.diffusion.train_text_encoder
    te = components.network(cfg, "text_encoder", trainable=train_te, place=place,
                            overrides=components.text_encoder_overrides(tok), seed_offset=1)
    vae = components.network(cfg, "vae", trainable=False, place=place)
    unet = components.network(cfg, "unet", trainable=True, place=place, seed_offset=2)
    if unet.config.cross_attention_dim != te.config.hidden_size:
        raise ValueError(f"unet cross_attention_dim {unet.config.cross_attention_dim} != text "
                         f"encoder hidden_size {te.config.hidden_size}")
    task = DiffusionTask(unet=unet.graphdef, vae=vae.graphdef, text_encoder=te.graphdef,
                         scheduler=sched, prediction_type=sched_conf["prediction_type"],
                         min_snr_gamma=cfg.diffusion.min_snr_gamma,
                         scaling_factor=float(vae.config.scaling_factor),
                         dtype=cfg.compute_dtype, remat_policy=cfg.remat_policy)
    trained = {"unet": unet.params} | ({"text_encoder": te.params} if train_te else {})
    frozen = {"vae": vae.params} | ({} if train_te else {"text_encoder": te.params})
    prepare = caption_batch(cfg, tok)

    def export_to(params: dict, folder: Path) -> None:
        f32 = jnp.float32
        nets = {"text_encoder": te, "vae": vae, "unet": unet}
        modules = {}
        for name, net in nets.items():
            p = params.get(name, net.params)
            modules[name] = nnx.merge(components.graph_of(name, net.config, f32),
                                      components.cast(p, f32))
        export.save_pipeline(folder, unet=modules["unet"], vae=modules["vae"],
                             text_encoder=modules["text_encoder"], tokenizer_dir=tok.folder,
                             scheduler_config=sched_conf, tokenizer=tok.tokenizer)

    return Setup(task=task, params=trained, frozen=frozen, prepare=prepare, export=export_to)


@dataclasses.dataclass(frozen=True)
class FrozenModel:
    """A pretrained model that an adapter task keeps fixed: its networks in the compute
    dtype, its tokenizer and its (training) scheduler."""
    nets: dict[str, Network]
    tokenizer: Tokenizer
    scheduler_config: dict


def frozen_model(cfg: TrainConfig, place) -> FrozenModel:
    """The recipe's pretrained text encoder, VAE and UNet, all frozen."""
    tok = components.tokenizer(cfg)
    nets = {name: components.network(cfg, name, trainable=False, place=place)
            for name in ("text_encoder", "vae", "unet")}
    return FrozenModel(nets, tok, scheduler_config(cfg))


def adapter_task(cfg: TrainConfig, model: FrozenModel, compose: Compose | None,
                 text_encoder: nnx.GraphDef | None = None,
                 controlnet: nnx.GraphDef | None = None) -> DiffusionTask:
    """The denoising loss of ``model`` with the networks built by ``compose`` (None: the
    trained weights are networks of their own, such as ``controlnet``'s) (``text_encoder``: a
    graph other than the model's, e.g. with a grown token table)."""
    conf = model.scheduler_config
    nets = model.nets
    return DiffusionTask(
        unet=nets["unet"].graphdef, vae=nets["vae"].graphdef,
        text_encoder=text_encoder or nets["text_encoder"].graphdef,
        scheduler=get_scheduler(default_scheduler_name(conf), conf),
        prediction_type=conf["prediction_type"], min_snr_gamma=cfg.diffusion.min_snr_gamma,
        scaling_factor=float(nets["vae"].config.scaling_factor), dtype=cfg.compute_dtype,
        remat_policy=cfg.remat_policy, compose=compose, controlnet=controlnet)


def caption_batch(cfg: TrainConfig, tokenize) -> Prepare:
    """The host-side batch of the denoising loss: pixels in [-1, 1] and token ids, with
    ``diffusion.caption_dropout`` of the captions emptied (decided by (seed, sample index),
    like everything else about a sample, so a resumed run drops the same ones)."""
    dropout = cfg.diffusion.caption_dropout

    def prepare(images: np.ndarray, captions: list[str], index: np.ndarray):
        if dropout > 0:
            u = np.array([np.random.default_rng([cfg.seed, int(i), 2]).random() for i in index])
            captions = ["" if drop else c for c, drop in zip(captions, u < dropout,
                                                                strict=True)]
        return {"pixels": to_unit_range(images), "input_ids": tokenize(captions)}

    return prepare
