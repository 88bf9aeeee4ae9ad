"""The denoiser seam of the sampling core (docs/architecture.md): a residual source whose
network's parameters are an argument like the UNet's (ControlNet's entry point), a per-step
conditioning selector (prompt editing's) and a guidance combiner (composable AND's) plug into
the one loop as functions, and what they read at run time changes the images without a
recompile."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sdjax import sampling
from sdjax.pipeline import StableDiffusionPipeline

STEPS = 3


class Probe(nnx.Module):
    """A stand-in network: a mid-block residual scale, the step from which the conditional
    rows are replaced by the unconditional ones (never, by default), and how much of the
    conditional prediction alone replaces the guided one."""

    def __init__(self):
        self.scale = nnx.Param(jnp.zeros(()))
        self.switch = nnx.Param(jnp.full((), 1000.0))
        self.mix = nnx.Param(jnp.zeros(()))


def residuals(params, inputs, step, x, cond):
    """Mid-block residual ``scale`` everywhere, no down residuals."""
    return None, params["probe"]["scale"][...] * jnp.ones((), x.dtype)


def select(params, inputs, step, cond):
    # Prompt editing's shape: the step's conditioning chosen from a stack by its index.
    b = cond.context.shape[0] // 2
    stack = jnp.stack([cond.context, jnp.concatenate([cond.context[:b]] * 2)])
    use = (step.index >= params["probe"]["switch"][...]).astype(jnp.int32)
    return cond._replace(context=stack[use])


def guide(params, inputs, step, eps, guidance):
    b = eps.shape[0] // 2
    guided = sampling.combine_guidance(eps[:b], eps[b:], guidance, step.sigma)
    mix = params["probe"]["mix"][...]
    return mix * eps[b:] + (1 - mix) * guided


@pytest.fixture(scope="module")
def pipe(sd1_folder):
    return StableDiffusionPipeline.from_pretrained(str(sd1_folder), dtype="float32",
                                                   num_devices=1)


def test_plugins_read_their_inputs_at_run_time(pipe, monkeypatch):
    base = pipe("a red circle", num_inference_steps=STEPS, seed=3).images
    empty = pipe("", num_inference_steps=STEPS, seed=3).images
    unguided = pipe("a red circle", num_inference_steps=STEPS, seed=3, guidance_scale=1).images
    plain = pipe._networks

    def networks(spec):
        nets = plain(spec)
        return sampling.Networks(nets.graphdefs, nets.dtype, nets.vae_scaling,
                                 encoder=nets.encoder, residuals=(residuals,), select=select,
                                 guide=guide)

    monkeypatch.setattr(pipe, "_networks", networks)
    pipe.store.add("probe", Probe())
    pipe._compiled.clear()
    params = dict(pipe.params)

    def run(scale=0.0, switch=1000.0, mix=0.0):
        probe = {k: nnx.Param(jnp.float32(v))
                 for k, v in (("scale", scale), ("switch", switch), ("mix", mix))}
        pipe.params = {**params, "probe": nnx.State(probe)}
        return pipe("a red circle", num_inference_steps=STEPS, seed=3).images.astype(int)

    count = pipe.compile_count
    same, switched, moved, conditional = run(), run(switch=0.0), run(scale=0.5), run(mix=1.0)
    assert pipe.compile_count == count + 1  # one program; the probe's values are runtime data
    assert np.abs(same - base).max() <= 1
    assert np.abs(switched - empty).max() <= 1 < 8 < np.abs(switched - base).max()
    assert np.abs(moved - base).max() > 8
    assert np.abs(conditional - unguided).max() <= 1 < 8 < np.abs(conditional - base).max()
