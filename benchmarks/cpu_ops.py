"""The CPU speed choices in sdjax, each timed against the form it replaced and against torch.

    python -m benchmarks.cpu_ops [--model mid] [--repeats 9]

Prints median milliseconds for:
- attention at the mid UNet's 32x32 self-attention shape: jax.nn.dot_product_attention's XLA
  form, sdjax's (layers.attention: query blocks, late normalisation), torch SDPA;
- GroupNorm + SiLU at UNet/VAE shapes: one reduction over (space, group channels), sdjax's
  (per-channel sums, then per group), torch;
- the model's UNet (batch 2, one evaluation) and VAE decode (batch 1) compiled with XLA's
  default options and with sdjax's (parallel.compiler_options: no YNNPACK hand-off), and in
  diffusers.
torch runs in this process with one thread per core this process may use (as throughput.py's
diffusers peer does). Differences under ~10% are within this machine's run-to-run noise; rerun.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import hardware
from benchmarks.models import ensure_folder
from sdjax import parallel
from sdjax.models.layers import GroupNorm, attention
from sdjax.weights.diffusers_folder import load_network, read_config


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def jax_ms(fn: Callable, *args, repeats: int, options: dict | None = None) -> float:
    compiled = jax.jit(fn, compiler_options=options)
    return median_ms(lambda: jax.block_until_ready(compiled(*args)), repeats)


def torch_ms(fn: Callable, *args, repeats: int) -> float:
    import torch
    with torch.inference_mode():
        return median_ms(lambda: fn(*args), repeats)


def single_reduction_group_norm(x: jax.Array, groups: int = 32) -> jax.Array:
    """The form sdjax's GroupNorm replaced (statistics in one reduction per group)."""
    shape = x.shape
    xg = x.reshape(shape[0], -1, groups, shape[-1] // groups)
    mean = xg.mean(axis=(1, 3), keepdims=True)
    var = jnp.square(xg - mean).mean(axis=(1, 3), keepdims=True)
    return jax.nn.silu(((xg - mean) * jax.lax.rsqrt(var + 1e-5)).reshape(shape))


def ops(repeats: int) -> None:
    import torch
    import torch.nn.functional as F  # noqa: N812
    rng = np.random.default_rng(0)
    b, t, heads, d = 2, 1024, 2, 48
    q, k, v = (rng.standard_normal((b, t, heads * d), np.float32) for _ in range(3))
    split = [a.reshape(b, t, heads, d) for a in (q, k, v)]
    torch_qkv = [torch.from_numpy(a).transpose(1, 2).contiguous() for a in split]
    def xla_sdpa(*a):
        return jax.nn.dot_product_attention(*a, implementation="xla")

    sdpa = torch.nn.functional.scaled_dot_product_attention
    print(f"attention {b}x{t} tokens, {heads} heads of {d}:")
    rows = {"jax.nn.dot_product_attention (xla)": jax_ms(xla_sdpa, *split, repeats=repeats),
            "sdjax layers.attention": jax_ms(lambda *a: attention(*a, heads), q, k, v,
                                             repeats=repeats),
            "torch SDPA": torch_ms(sdpa, *torch_qkv, repeats=repeats)}
    for name, ms in rows.items():
        print(f"  {name:36s} {ms:8.2f} ms")

    for shape in [(2, 32, 32, 96), (2, 16, 16, 192), (1, 64, 64, 128), (1, 128, 128, 64),
                  (1, 256, 256, 32)]:
        x = rng.standard_normal(shape, np.float32) * 3 + 1
        norm = GroupNorm(32, shape[-1])
        xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
        base = jax_ms(single_reduction_group_norm, x, repeats=repeats)
        ours = jax_ms(lambda a, n=norm: jax.nn.silu(n(a)), x, repeats=repeats)
        ref = torch_ms(lambda a: F.silu(F.group_norm(a, 32)), xt, repeats=repeats)
        print(f"GroupNorm+SiLU {'x'.join(map(str, shape))}: single reduction {base:.2f} ms, "
              f"sdjax {ours:.2f} ms, torch {ref:.2f} ms")


def networks(model: str, repeats: int) -> None:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    folder = ensure_folder(model)
    unet_cfg, vae_cfg = read_config(folder, "unet"), read_config(folder, "vae")
    unet = load_network(folder, "unet", dtype=jnp.float32, place=jnp.asarray, config=unet_cfg)
    vae = load_network(folder, "vae", dtype=jnp.float32, place=jnp.asarray, config=vae_cfg)
    side = unet_cfg.sample_size
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, side, side, unet_cfg.in_channels), np.float32)
    context = rng.standard_normal((2, 77, unet_cfg.cross_attention_dim), np.float32)
    steps = np.array([500, 500], np.int32)
    unet_g, unet_p = nnx.split(unet)
    vae_g, vae_p = nnx.split(vae)

    def run_unet(p, z, s, c):
        return nnx.merge(unet_g, p)(z, s, c)

    def run_decode(p, z):
        return nnx.merge(vae_g, p).decode(z)

    sdjax_options = parallel.compiler_options(parallel.make_mesh(1))
    for label, options in (("XLA default options", None), ("sdjax options", sdjax_options)):
        u = jax_ms(run_unet, unet_p, z, steps, context, repeats=repeats, options=options)
        dec = jax_ms(run_decode, vae_p, z[:1], repeats=repeats, options=options)
        print(f"{model} {label:20s} UNet b2 {u:8.1f} ms   VAE decode b1 {dec:8.1f} ms")
    tu = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    tv = AutoencoderKL.from_pretrained(folder / "vae").eval()
    zt = torch.from_numpy(z).permute(0, 3, 1, 2).contiguous()
    u = torch_ms(lambda: tu(zt, torch.from_numpy(steps), torch.from_numpy(context)),
                 repeats=repeats)
    dec = torch_ms(lambda: tv.decode(zt[:1]), repeats=repeats)
    print(f"{model} {'diffusers':20s} UNet b2 {u:8.1f} ms   VAE decode b1 {dec:8.1f} ms")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu_ops", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mid", help="shape for the whole-network timings")
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(hardware.cpu_count())
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads")
    ops(args.repeats)
    networks(args.model, args.repeats)


if __name__ == "__main__":
    main()
