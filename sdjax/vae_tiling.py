"""VAE decoding in overlapping tiles, for outputs whose full-size decode would not fit.

The method is diffusers' ``AutoencoderKL.tiled_decode`` (``enable_vae_tiling``), so a tiled
decode gives the reference's numbers: the latents are cut into square tiles of the VAE's
native size (``sample_size`` pixels, ``sample_size / factor`` latents) starting every
``(1 - overlap)`` of a tile, the last tiles of a row or column being smaller; each tile is
decoded alone; then, in row-major order, each decoded tile's first ``overlap`` share of rows
and columns is blended linearly with the already-blended tile above and to the left, and the
first ``(1 - overlap)`` of every tile is kept. The decoder's group norms and mid-block attention
see one tile at a time, so the result is close to, not equal to, an untiled decode.

Inside the compiled call, tiles of one shape are decoded one at a time by ``jax.lax.map``
(memory: one tile's activations); a program has one decoder trace per tile shape (full
tiles, and the one or two shorter last tiles of a row and of a column: at most nine).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

OVERLAP = 0.25  # diffusers' tile_overlap_factor


@dataclasses.dataclass(frozen=True)
class VaeTiling:
    """How to cut the latents: ``tile`` latents a side, ``factor`` pixels per latent."""

    tile: int
    factor: int
    overlap: float = OVERLAP

    @classmethod
    def for_vae(cls, vae_config) -> VaeTiling:
        """diffusers' settings for a VAE: tiles of its ``sample_size`` pixels."""
        f = vae_config.downsample_factor
        return cls(tile=int(vae_config.sample_size / f), factor=f)

    @property
    def stride(self) -> int:
        """Latents from one tile's start to the next's."""
        return int(self.tile * (1 - self.overlap))

    @property
    def blend(self) -> int:
        """Pixels blended across each seam."""
        return int(self.tile * self.factor * self.overlap)

    def applies(self, latent_h: int, latent_w: int) -> bool:
        """Whether latents of this size span more than one tile (else tiling is the plain
        decode, as in diffusers) and the tiles reassemble to the full size (true of every
        VAE whose ``sample_size`` is a multiple of 4 factors)."""
        keep = self.tile * self.factor - self.blend
        return (latent_h > self.tile or latent_w > self.tile) and self.stride > 0 \
            and self.stride * self.factor == keep

    def spans(self, n: int) -> list[tuple[int, int]]:
        """(start, length) of the tiles along an axis of ``n`` latents."""
        return [(s, min(self.tile, n - s)) for s in range(0, n, self.stride)]


def _blend(a: jax.Array, b: jax.Array, extent: int, axis: int) -> jax.Array:
    """``b`` with its first ``extent`` rows (axis 1) or columns (axis 2) faded in from the last
    ones of ``a``, the tile before it: weight ``k / extent`` on ``b`` at offset ``k``."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent == 0:
        return b
    w = jnp.arange(extent, dtype=b.dtype) / extent
    w = w.reshape((extent, 1, 1) if axis == 1 else (extent, 1))
    head_a = jax.lax.slice_in_dim(a, a.shape[axis] - extent, a.shape[axis], axis=axis)
    head_b = jax.lax.slice_in_dim(b, 0, extent, axis=axis)
    mixed = head_a * (1 - w) + head_b * w
    return jax.lax.dynamic_update_slice_in_dim(b, mixed, 0, axis=axis)


def tiled_decode(decode: Callable[[jax.Array], jax.Array], z: jax.Array,
                 tiling: VaeTiling) -> jax.Array:
    """``decode`` (NHWC latents -> NHWC pixels) applied tile by tile to ``z`` (B, h, w, C)
    and blended back into (B, h * factor, w * factor, channels)."""
    rows, cols = tiling.spans(z.shape[1]), tiling.spans(z.shape[2])
    by_shape: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for i, (_, rh) in enumerate(rows):
        for j, (_, cw) in enumerate(cols):
            by_shape.setdefault((rh, cw), []).append((i, j))
    tiles: dict[tuple[int, int], jax.Array] = {}
    for (rh, cw), where in by_shape.items():
        stack = jnp.stack([z[:, rows[i][0]:rows[i][0] + rh, cols[j][0]:cols[j][0] + cw]
                           for i, j in where])
        decoded = jax.lax.map(decode, stack)
        tiles.update({ij: decoded[k] for k, ij in enumerate(where)})
    # The reference blends in place, row by row: a tile mixes with its neighbours above and
    # to the left as they are after their own blending.
    for i in range(len(rows)):
        for j in range(len(cols)):
            t = tiles[i, j]
            if i > 0:
                t = _blend(tiles[i - 1, j], t, tiling.blend, axis=1)
            if j > 0:
                t = _blend(tiles[i, j - 1], t, tiling.blend, axis=2)
            tiles[i, j] = t
    keep = tiling.tile * tiling.factor - tiling.blend
    return jnp.concatenate([
        jnp.concatenate([tiles[i, j][:, :keep, :keep] for j in range(len(cols))], axis=2)
        for i in range(len(rows))], axis=1)
