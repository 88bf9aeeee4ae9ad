"""XLA's memory estimate for the x4 upscaler's VAE decode, whole against tiled.

    python -m benchmarks.upscale_decode_memory [--latents 128 256 512] [--dtype float32]

The decoder has the shape of ``stabilityai/stable-diffusion-x4-upscaler``'s VAE (three levels,
128/256/512 channels, sample_size 256: tiles of 64 latents) with abstract weights: nothing is
initialised or run, each program is only compiled for this machine's backend and its
``memory_analysis()`` read (temporaries and outputs of one image's decode). Latents of side n
decode to 4n pixels: 512 is a 512x512 input's 2048x2048 output.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from sdjax.models.vae import AutoencoderKL, VAEConfig
from sdjax.vae_tiling import VaeTiling, tiled_decode

X4_VAE = VAEConfig(block_out_channels=(128, 256, 512), layers_per_block=2,
                   down_block_types=("DownEncoderBlock2D",) * 3,
                   up_block_types=("UpDecoderBlock2D",) * 3, sample_size=256,
                   scaling_factor=0.08333)


def measure(n: int, tiled: bool, dtype) -> dict:
    abstract = nnx.eval_shape(lambda: AutoencoderKL(X4_VAE, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    tiling = VaeTiling.for_vae(X4_VAE)

    def decode(state, z):
        vae = nnx.merge(graphdef, state)
        return tiled_decode(vae.decode, z, tiling) if tiled else vae.decode(z)

    z = jax.ShapeDtypeStruct((1, n, n, 4), dtype)
    t0 = time.perf_counter()
    compiled = jax.jit(decode).lower(state, z).compile()
    mem = compiled.memory_analysis()
    return {"latents": n, "output": 4 * n, "tiled": tiled,
            "temp_gib": mem.temp_size_in_bytes / 2**30,
            "output_gib": mem.output_size_in_bytes / 2**30,
            "compile_s": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latents", type=int, nargs="+", default=[128, 256, 512])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--whole", action=argparse.BooleanOptionalAction, default=True,
                   help="also compile the whole decode")
    args = p.parse_args()
    dtype = jnp.dtype(args.dtype)
    print(f"backend {jax.default_backend()}, {args.dtype}")
    print("| latents | output px | decode | temp GiB | output GiB | compile s |")
    print("|---|---|---|---|---|---|")
    for n in args.latents:
        for tiled in ((False, True) if args.whole else (True,)):
            r = measure(n, tiled, dtype)
            print(f"| {n} | {4 * n} | {'tiled' if tiled else 'whole'} | {r['temp_gib']:.2f} "
                  f"| {r['output_gib']:.3f} | {r['compile_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
