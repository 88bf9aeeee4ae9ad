"""The CPU speed choices in sdjax, each timed against the form it replaced and against torch.

    python -m benchmarks.cpu_ops [--model mid] [--size 512] [--repeats 9] [--only ops|networks]

Prints median milliseconds for:
- attention at the UNet's and VAE's shapes at 256² and 512² (the mid UNet's 2 heads at 1024
  tokens, SD 1.5's 8 heads of 40 at 4096 tokens and of 80 at 1024, its cross-attention, the
  VAE mid-block's one 512-wide head at 4096 tokens): jax.nn.dot_product_attention's XLA form,
  sdjax's (layers.attention: heads and query blocks in a loop, late normalisation), torch SDPA;
- GroupNorm + SiLU at UNet/VAE shapes up to the SD VAE decoder's at 512²: one reduction over
  (space, group channels), sdjax's (per-channel sums, then per group), torch;
- each level of the model's UNet at --size: its 3x3 convolution and GEGLU projection, with
  XLA's defaults (YNNPACK), without YNNPACK, and in torch (``benchmarks.op_profile`` splits
  the whole UNet's time by op class);
- the model's UNet (batch 2, one evaluation) and VAE decode (batch 1) at --size pixels,
  compiled with XLA's default options and with sdjax's (parallel.compiler_options: no YNNPACK
  hand-off up to 256x256 pixels, XLA's defaults above), and in diffusers.
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


# (name, batch, query tokens, key tokens, heads, head width)
ATTENTION_SHAPES = [
    ("mid UNet 256² level 1", 2, 1024, 1024, 2, 48),
    ("SD 1.5 512² level 1", 2, 4096, 4096, 8, 40),
    ("SD 1.5 512² level 1, cross", 2, 4096, 77, 8, 40),
    ("SD 1.5 512² level 2", 2, 1024, 1024, 8, 80),
    ("SD VAE 512² mid block", 1, 4096, 4096, 1, 512),
]
GROUP_NORM_SHAPES = [(2, 32, 32, 96), (2, 16, 16, 192), (2, 64, 64, 320), (1, 64, 64, 128),
                     (1, 128, 128, 64), (1, 256, 256, 32), (1, 64, 64, 512),
                     (1, 128, 128, 512), (1, 256, 256, 256), (1, 512, 512, 128)]


def ops(repeats: int) -> None:
    import torch
    import torch.nn.functional as F  # noqa: N812
    rng = np.random.default_rng(0)

    def xla_sdpa(*a):
        return jax.nn.dot_product_attention(*a, implementation="xla")

    sdpa = torch.nn.functional.scaled_dot_product_attention
    for name, b, t, s, heads, d in ATTENTION_SHAPES:
        q = rng.standard_normal((b, t, heads * d), np.float32)
        k, v = (rng.standard_normal((b, s, heads * d), np.float32) for _ in range(2))
        split = [a.reshape(b, -1, heads, d) for a in (q, k, v)]
        torch_qkv = [torch.from_numpy(a).transpose(1, 2).contiguous() for a in split]
        rows = {"jax.nn.dot_product_attention (xla)": jax_ms(xla_sdpa, *split, repeats=repeats),
                "sdjax layers.attention": jax_ms(lambda *a, n=heads: attention(*a, n), q, k, v,
                                                 repeats=repeats),
                "torch SDPA": torch_ms(sdpa, *torch_qkv, repeats=repeats)}
        print(f"attention, {name}: {b}x{t} queries, {s} keys, {heads} heads of {d}: "
              + ", ".join(f"{label} {ms:.1f} ms" for label, ms in rows.items()), flush=True)

    for shape in GROUP_NORM_SHAPES:
        x = rng.standard_normal(shape, np.float32) * 3 + 1
        norm = GroupNorm(32, shape[-1])
        xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
        base = jax_ms(single_reduction_group_norm, x, repeats=repeats)
        ours = jax_ms(lambda a, n=norm: jax.nn.silu(n(a)), x, repeats=repeats)
        ref = torch_ms(lambda a: F.silu(F.group_norm(a, 32)), xt, repeats=repeats)
        print(f"GroupNorm+SiLU {'x'.join(map(str, shape))}: single reduction {base:.2f} ms, "
              f"sdjax {ours:.2f} ms, torch {ref:.2f} ms", flush=True)


def unet_level_ops(model: str, size: int | None, repeats: int) -> None:
    """Each UNet level's 3x3 convolution (batch 2, channels in = out) and GEGLU projection
    (dim -> 8 dim over the level's tokens) at --size: XLA's defaults (YNNPACK), XLA's own
    kernels (YNNPACK off), torch."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    cfg = read_config(ensure_folder(model), "unet")
    side = (size // 8) if size else cfg.sample_size
    rng = np.random.default_rng(0)
    no_ynn = parallel.compiler_options(parallel.make_mesh(1), 1)

    def conv3x3(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    for level, ch in enumerate(cfg.block_out_channels):
        s = side >> level
        x = rng.standard_normal((2, s, s, ch), np.float32)
        w = rng.standard_normal((3, 3, ch, ch), np.float32) * 0.05
        xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
        wt = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous()
        rows = {"XLA defaults": jax_ms(conv3x3, x, w, repeats=repeats),
                "YNNPACK off": jax_ms(conv3x3, x, w, repeats=repeats, options=no_ynn),
                "torch": torch_ms(lambda a, b: F.conv2d(a, b, padding=1), xt, wt,
                                  repeats=repeats)}
        print(f"conv 3x3 2x{s}x{s}x{ch} -> {ch}: "
              + ", ".join(f"{label} {ms:.1f} ms" for label, ms in rows.items()), flush=True)
        tokens = rng.standard_normal((2 * s * s, ch), np.float32)
        kernel = rng.standard_normal((ch, 8 * ch), np.float32) * 0.05
        tt, kt = torch.from_numpy(tokens), torch.from_numpy(kernel.T.copy())
        rows = {"XLA defaults": jax_ms(jnp.dot, tokens, kernel, repeats=repeats),
                "YNNPACK off": jax_ms(jnp.dot, tokens, kernel, repeats=repeats, options=no_ynn),
                "torch": torch_ms(F.linear, tt, kt, repeats=repeats)}
        print(f"GEGLU projection {2 * s * s}x{ch} -> {8 * ch}: "
              + ", ".join(f"{label} {ms:.1f} ms" for label, ms in rows.items()), flush=True)


def networks(model: str, size: int | None, repeats: int) -> None:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    folder = ensure_folder(model)
    unet_cfg, vae_cfg = read_config(folder, "unet"), read_config(folder, "vae")
    unet = load_network(folder, "unet", dtype=jnp.float32, place=jnp.asarray, config=unet_cfg)
    vae = load_network(folder, "vae", dtype=jnp.float32, place=jnp.asarray, config=vae_cfg)
    side = size // 8 if size else unet_cfg.sample_size
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

    sdjax_options = parallel.compiler_options(parallel.make_mesh(1), side * side)
    for label, options in (("XLA default options", None), ("sdjax options", sdjax_options)):
        u = jax_ms(run_unet, unet_p, z, steps, context, repeats=repeats, options=options)
        dec = jax_ms(run_decode, vae_p, z[:1], repeats=repeats, options=options)
        print(f"{model} {side * 8}² {label:20s} UNet b2 {u:8.1f} ms   "
              f"VAE decode b1 {dec:8.1f} ms", flush=True)
    tu = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    tv = AutoencoderKL.from_pretrained(folder / "vae").eval()
    zt = torch.from_numpy(z).permute(0, 3, 1, 2).contiguous()
    u = torch_ms(lambda: tu(zt, torch.from_numpy(steps), torch.from_numpy(context)),
                 repeats=repeats)
    dec = torch_ms(lambda: tv.decode(zt[:1]), repeats=repeats)
    print(f"{model} {side * 8}² {'diffusers':20s} UNet b2 {u:8.1f} ms   "
          f"VAE decode b1 {dec:8.1f} ms")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu_ops", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mid", help="shape for the whole-network timings")
    p.add_argument("--size", type=int, default=None,
                   help="image side in pixels for the whole-network timings (default: the "
                        "model's)")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--only", choices=("ops", "networks"), default=None)
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(hardware.cpu_count())
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads")
    if args.only != "networks":
        ops(args.repeats)
        unet_level_ops(args.model, args.size, args.repeats)
    if args.only != "ops":
        networks(args.model, args.size, args.repeats)


if __name__ == "__main__":
    main()
