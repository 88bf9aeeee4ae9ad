"""The optimizer from a recipe: AdamW with linear warm-up and a decay schedule, global-norm
clipping, and gradient accumulation over micro-batches; plus the EMA of the weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from sdjax.train.config import OptimConfig


def learning_rate(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    peak, warm = cfg.learning_rate, cfg.warmup_steps
    rest = max(total_steps - warm, 1)
    end = peak * cfg.final_lr_fraction
    if cfg.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, rest, alpha=cfg.final_lr_fraction)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(peak, end, rest)
    else:
        raise ValueError(f"optim.schedule must be constant, cosine or linear, got "
                         f"{cfg.schedule!r}")
    if warm <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), after], [warm])


def optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """``total_steps`` counts optimizer steps; with ``accumulate_steps`` k, ``update`` is
    called k times per step and applies the mean gradient on the k-th."""
    parts = []
    if cfg.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    parts.append(optax.adamw(learning_rate(cfg, total_steps), b1=cfg.b1, b2=cfg.b2,
                             eps=cfg.eps, weight_decay=cfg.weight_decay))
    tx = optax.chain(*parts)
    if cfg.accumulate_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.accumulate_steps)
    return tx


def applied_update(cfg: OptimConfig, opt_state) -> jax.Array:
    """Whether the ``update`` that produced ``opt_state`` changed the weights (always, unless
    accumulating)."""
    if cfg.accumulate_steps > 1:
        return optax.MultiSteps(optax.identity(), cfg.accumulate_steps).has_updated(opt_state)
    return jnp.asarray(True)


def ema_update(ema, params, decay: float, step: jax.Array):
    """One EMA step with the usual warm-up ((1 + n) / (10 + n) caps the decay early on, so the
    average is not dominated by the random initialisation)."""
    n = step.astype(jnp.float32)
    d = jnp.minimum(decay, (1.0 + n) / (10.0 + n))
    return jax.tree.map(lambda e, p: e * d + p.astype(e.dtype) * (1.0 - d), ema, params)
