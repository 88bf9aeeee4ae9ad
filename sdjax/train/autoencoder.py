"""task="vae": train the AutoencoderKL itself, reconstruction (MSE and/or L1) plus a weighted
KL term that keeps the latent distribution close to N(0, 1) (the LDM recipe without its
perceptual and adversarial terms, which a toy of flat shapes does not need)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdjax.train import components
from sdjax.train.config import TrainConfig
from sdjax.train.data import make_source, to_unit_range
from sdjax.train.task import Metrics, Setup, remat
from sdjax.weights import export


@dataclasses.dataclass(frozen=True)
class AutoencoderTask:
    vae: nnx.GraphDef
    mse_weight: float
    l1_weight: float
    kl_weight: float
    dtype: str
    remat_policy: str | None

    def loss(self, params, frozen, batch, key) -> tuple[jax.Array, Metrics]:
        del frozen

        def forward(p, x, key):
            vae = nnx.merge(self.vae, components.cast(p, jnp.dtype(self.dtype)))
            mean, logvar = vae.encode(x.astype(self.dtype))
            mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
            z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
            return vae.decode(z.astype(self.dtype)).astype(jnp.float32), mean, logvar

        x = batch["pixels"]
        recon, mean, logvar = remat(forward, self.remat_policy)(params["vae"], x, key)
        err = recon - x
        mse, l1 = jnp.mean(jnp.square(err)), jnp.mean(jnp.abs(err))
        # KL(q(z|x) || N(0, I)) per latent element.
        kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
        loss = self.mse_weight * mse + self.l1_weight * l1 + self.kl_weight * kl
        return loss, {"mse": mse, "l1": l1, "kl": kl}


def latent_std(vae_graph: nnx.GraphDef, params, cfg: TrainConfig, place) -> float:
    """Spread of sampled latents over ``scaling_batches`` batches of the training data, read
    from its start (the stream is deterministic); its inverse is the scaling_factor that
    gives the diffusion model unit-variance latents, as SD's 0.18215 was chosen."""
    source = make_source(cfg.data, cfg.seed)
    encode = jax.jit(lambda p, x, k: _sample(vae_graph, p, x, k))
    total, total_sq, n = 0.0, 0.0, 0
    for b in range(cfg.autoencoder.scaling_batches):
        idx = range(b * cfg.batch_size, (b + 1) * cfg.batch_size)
        x = to_unit_range(np.stack([source.get(i)[0] for i in idx]))
        z = np.asarray(encode(params, place(x), jax.random.key(b)), np.float64)
        total, total_sq, n = total + z.sum(), total_sq + np.square(z).sum(), n + z.size
    mean = total / n
    return float(np.sqrt(total_sq / n - mean * mean))


def _sample(vae_graph, params, x, key):
    vae = nnx.merge(vae_graph, params)
    mean, logvar = vae.encode(x)
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)


def setup(cfg: TrainConfig, place) -> Setup:
    vae = components.network(cfg, "vae", trainable=True, place=place)
    a = cfg.autoencoder
    task = AutoencoderTask(vae=vae.graphdef, mse_weight=a.mse_weight, l1_weight=a.l1_weight,
                           kl_weight=a.kl_weight, dtype=cfg.compute_dtype,
                           remat_policy=cfg.remat_policy)

    def prepare(images: np.ndarray, captions: list[str], index: np.ndarray):
        return {"pixels": to_unit_range(images)}

    def export_to(params: dict, folder: Path) -> None:
        graph = components.graph_of("vae", vae.config, jnp.float32)
        config = vae.config
        if a.scaling_batches > 0:
            std = latent_std(graph, params["vae"], cfg, place)
            config = dataclasses.replace(config, scaling_factor=round(1.0 / std, 5))
        module = nnx.merge(components.graph_of("vae", config, jnp.float32), params["vae"])
        export.save_network(Path(folder) / "vae", module)

    return Setup(task=task, params={"vae": vae.params}, frozen={}, prepare=prepare,
                 export=export_to)
