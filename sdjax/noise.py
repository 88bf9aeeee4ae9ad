"""The start noise of a call and the WebUI's noise sources, in JAX (no torch at run time).

Three sources (``CoreSpec.rng``, ``pipe(..., rng=...)``):

- ``"jax"``: image i's noise from the key ``fold_in(key(seed), i)`` (split; the first half
  draws the start noise, the second the stochastic schedulers' per-step noise);
- ``"nv"``: the WebUI's NV generator (its ``modules/rng_philox.py``, which reproduces torch's
  CUDA ``randn``, the WebUI's default "GPU" source on NVIDIA cards): Philox4x32-10 keyed by the
  64-bit seed, counter ``(offset, 0, index, 0)``, one Box-Muller normal from each counter's
  first two words; ``offset`` counts the draws made from one generator;
- ``"cpu"``: torch's CPU generator's ``torch.randn(shape, generator=Generator().manual_seed(s))``
  in float32: MT19937 seeded as torch seeds it; for 16 or more elements uniform floats from 24
  bits of each word, Box-Muller over blocks of 16 (8 radii, then 8 angles) and, when the size
  is not a multiple of 16, the last 16 values redrawn from 16 more words; under 16 elements
  torch's scalar double-precision normal (two 53-bit uniforms per pair, the second value of a
  pair kept for the next).

The WebUI's tensors are (C, H, W); ours are (H, W, C): a draw is made in the WebUI's order and
transposed. Seeds per image (DESIGN.md): with ``nv``/``cpu`` image i uses ``seed + i`` (the
call's per-image seed plus its index), or, with variation seeds on (a strength other than 0),
``seed`` for every image and ``subseed + i``; with ``jax`` the keys ``(seed, i)`` and
``(subseed, i)``. Variation seeds are the WebUI's ``slerp`` of the two noises; ``seed_resize_from``
draws the seed's noise at that size and places it in the middle of the new one
(``modules/rng.py``'s ``ImageRNG.first``).

Every function here is traced per image under ``vmap`` inside the compiled call, so the noise
is the same for any device count.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.validation import RNG_NAMES

# The batched inputs of the compiled call that this module reads (one row per image).
SUBSEEDS, STRENGTH, ENSD = "subseeds", "subseed_strength", "eta_noise_seed_delta"
INPUT_NAMES = (SUBSEEDS, STRENGTH, ENSD)

U32 = jnp.uint32


def _u32(x) -> jax.Array:
    return jnp.asarray(x, U32)


# ----------------------------------------------------------------------------- jax keys
def image_keys(seeds: jax.Array, indices: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(start-noise keys, per-step keys) of each image: ``fold_in(key(seed), i)``, split."""
    keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seeds, indices)
    halves = jax.vmap(jax.random.split)(keys)
    return halves[:, 0], halves[:, 1]


# ----------------------------------------------------------------------------- NV: Philox
PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
# The WebUI's float32 constants: 2**-32 (exactly) and 2**-32 * 2 pi.
NV_TWO_POW32_INV = float(np.float32(2.3283064e-10))
NV_TWO_POW32_INV_2PI = float(np.float32(2.3283064e-10 * 6.2831855))


def _mulhilo(a: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
    """(high, low) 32-bit words of the 64-bit product ``a * m`` in uint32 arithmetic."""
    al, ah = a & 0xFFFF, a >> 16
    ml, mh = _u32(m & 0xFFFF), _u32(m >> 16)
    ll, lh, hl, hh = al * ml, al * mh, ah * ml, ah * mh
    mid = (ll >> 16) + (lh & 0xFFFF) + (hl & 0xFFFF)
    return hh + (lh >> 16) + (hl >> 16) + (mid >> 16), a * _u32(m)


def philox4x32(counter: tuple, key: tuple, rounds: int = 10) -> tuple:
    """Philox4x32 (Salmon et al. 2011) as the WebUI's ``philox4_32``: ``counter`` four uint32
    arrays, ``key`` two; the key is bumped by the Weyl constants between rounds."""
    c0, c1, c2, c3 = (_u32(c) for c in counter)
    k0, k1 = (_u32(k) for k in key)
    for r in range(rounds):
        if r:
            k0, k1 = k0 + _u32(PHILOX_W[0]), k1 + _u32(PHILOX_W[1])
        hi0, lo0 = _mulhilo(c0, PHILOX_M[0])
        hi1, lo1 = _mulhilo(c2, PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def nv_randn(seed_lo: jax.Array, seed_hi: jax.Array, offset: jax.Array,
             shape: tuple[int, ...]) -> jax.Array:
    """The WebUI's ``rng_philox.Generator(seed)`` at ``offset`` (draws already made):
    ``randn(shape)``, float32 in the shape's own (C-contiguous) order. ``seed_lo``/``seed_hi``
    are the 64-bit seed's uint32 halves (the Philox key)."""
    n = math.prod(shape)
    index = jnp.arange(n, dtype=U32)
    zero = jnp.zeros((n,), U32)
    x, y, _, _ = philox4x32((zero + _u32(offset), zero, index, zero), (seed_lo, seed_hi))
    # u = (x + 1/2) 2**-32, as float64 in the WebUI; its upper half from 1 - u (exact in
    # integers) so the logarithm keeps its precision near 1.
    upper = x >= _u32(1 << 31)
    small = jnp.where(upper, ~x, x).astype(jnp.float32) * NV_TWO_POW32_INV \
        + NV_TWO_POW32_INV / 2
    log_u = jnp.where(upper, jnp.log1p(-small), jnp.log(small))
    v = y.astype(jnp.float32) * NV_TWO_POW32_INV_2PI + NV_TWO_POW32_INV_2PI / 2
    return (jnp.sqrt(-2.0 * log_u) * jnp.sin(v)).reshape(shape)


# ----------------------------------------------------------------------------- CPU: MT19937
MT_N, MT_M = 624, 397
MT_A, MT_UPPER, MT_LOWER = 0x9908B0DF, 0x80000000, 0x7FFFFFFF


def _mt_seed(seed: jax.Array) -> jax.Array:
    """torch's ``mt19937(seed)`` state (624 words, not yet twisted)."""
    seed = _u32(seed)

    def body(prev, j):
        nxt = _u32(1812433253) * (prev ^ (prev >> 30)) + j
        return nxt, nxt
    _, rest = jax.lax.scan(body, seed, jnp.arange(1, MT_N, dtype=U32), unroll=8)
    return jnp.concatenate([seed[None], rest])


def _twist_pair(u: jax.Array, v: jax.Array) -> jax.Array:
    y = (u & _u32(MT_UPPER)) | (v & _u32(MT_LOWER))
    return (y >> 1) ^ jnp.where((v & 1) == 1, _u32(MT_A), _u32(0))


def _twist(mt: jax.Array) -> jax.Array:
    """One regeneration of the 624 words (torch's ``next_state``), in four vector pieces: each
    word reads the one 397 ahead, which for the later words is already the new one."""
    k = MT_N - MT_M  # 227
    a = mt[MT_M:] ^ _twist_pair(mt[:k], mt[1:k + 1])                    # words 0..226
    b = a ^ _twist_pair(mt[k:2 * k], mt[k + 1:2 * k + 1])               # 227..453
    c = b[:MT_N - 1 - 2 * k] ^ _twist_pair(mt[2 * k:MT_N - 1], mt[2 * k + 1:])  # 454..622
    d = b[MT_N - 1 - 2 * k] ^ _twist_pair(mt[MT_N - 1], a[0])           # 623
    return jnp.concatenate([a, b, c, d[None]])


def _temper(y: jax.Array) -> jax.Array:
    y = y ^ (y >> 11)
    y = y ^ ((y << 7) & _u32(0x9D2C5680))
    y = y ^ ((y << 15) & _u32(0xEFC60000))
    return y ^ (y >> 18)


def cpu_state(seed: jax.Array):
    """A fresh ``torch.Generator().manual_seed(seed)`` (seeds mod 2**32, as torch's): (the
    current block of words, untwisted after seeding; how many of its words were output, 624
    after seeding; torch's kept double normal; whether one is kept)."""
    return (_mt_seed(seed), jnp.int32(MT_N), jnp.float32(0), jnp.bool_(False))


def _mt_words(state, count: int, advance=None):
    """(``count`` output words from ``state``, the state after ``advance`` of them (a traced
    int, at most ``count``; default all))."""
    block, used, cached, has = state
    twists = count // MT_N + 1

    def body(b, _):
        b = _twist(b)
        return b, b
    _, blocks = jax.lax.scan(body, block, None, length=twists)
    raw = jnp.concatenate([block[None], blocks])
    out = jax.lax.dynamic_slice(_temper(raw.reshape(-1)), (used,), (count,))
    end = used + (count if advance is None else advance)
    j = end // MT_N
    return out, (raw[j], end - j * MT_N, cached, has)


def _uniform24(words: jax.Array) -> jax.Array:
    return (words & 0xFFFFFF).astype(jnp.float32) * (2.0 ** -24)


def _box_muller16(u: jax.Array) -> jax.Array:
    """torch's ``normal_fill_16`` over (..., 16) uniforms: radii from the first 8, angles from
    the last 8; cosines first."""
    radius = jnp.sqrt(-2.0 * jnp.log(1.0 - u[..., :8]))
    theta = np.float32(2.0 * math.pi) * u[..., 8:]
    return jnp.concatenate([radius * jnp.cos(theta), radius * jnp.sin(theta)], axis=-1)


def _turn_sincos(hi21: jax.Array, lo32: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) of 2 pi u for the 53-bit uniform u = (hi21 * 2**32 + lo32) / 2**53, reduced
    to a quarter turn in integers so float32 keeps the angle's precision."""
    quarter = hi21 >> 19
    rest = (hi21 & 0x7FFFF).astype(jnp.float32) * 2.0 ** -19 \
        + lo32.astype(jnp.float32) * 2.0 ** -51  # in [0, 1) of a quarter turn
    up = rest >= 0.5
    quarter = (quarter + up.astype(U32)) & 3
    a = (jnp.where(up, rest - 1.0, rest)) * np.float32(math.pi / 2)
    s, c = jnp.sin(a), jnp.cos(a)
    cos = jnp.select([quarter == 0, quarter == 1, quarter == 2], [c, -s, -c], s)
    sin = jnp.select([quarter == 0, quarter == 1, quarter == 2], [s, c, -s], -c)
    return cos, sin


def _scalar_normals(words: jax.Array) -> jax.Array:
    """torch's double ``normal_distribution`` pairs from (pairs, 4) words: (pairs, 2) values
    (r cos, r sin) with u1 (angle) then u2 (radius) from ``random64`` (first word high)."""
    hi1, lo1 = words[:, 0] & 0x1FFFFF, words[:, 1]
    hi2, lo2 = words[:, 2] & 0x1FFFFF, words[:, 3]
    u2 = hi2.astype(jnp.float32) * 2.0 ** -21 + lo2.astype(jnp.float32) * 2.0 ** -53
    # 1 - u2 = (2**53 - v2) / 2**53, exactly in integers.
    borrow = (lo2 != 0).astype(U32)
    one_minus = (_u32(1 << 21) - hi2 - borrow).astype(jnp.float32) * 2.0 ** -21 \
        + (jnp.where(lo2 != 0, -lo2, 0)).astype(jnp.float32) * 2.0 ** -53
    log = jnp.where(u2 < 0.5, jnp.log1p(-u2), jnp.log(one_minus))
    r = jnp.sqrt(-2.0 * log)
    cos, sin = _turn_sincos(hi1, lo1)
    return jnp.stack([r * cos, r * sin], axis=-1)


def cpu_randn(state, shape: tuple[int, ...]):
    """``torch.randn(shape, generator=g)`` for the generator ``state`` (:func:`cpu_state`):
    (float32 values in the shape's order, the generator's state after)."""
    n = math.prod(shape)
    if n >= 16:
        count = n + (16 if n % 16 else 0)
        words, state = _mt_words(state, count)
        u = _uniform24(words)
        out = _box_muller16(u[:n - n % 16].reshape(-1, 16)).reshape(-1)
        if n % 16:
            out = jnp.concatenate([out[:n - 16], _box_muller16(u[n:])])
        return out.reshape(shape), state
    _, _, cached, has = state
    pairs = (n + 1) // 2
    fresh = n - has.astype(jnp.int32)  # values this draw takes from new pairs
    words, (block, used, _, _) = _mt_words(state, 4 * pairs, 4 * ((fresh + 1) // 2))
    values = _scalar_normals(words.reshape(pairs, 4)).reshape(-1)
    padded = jnp.concatenate([cached[None], values])
    out = jnp.where(has, padded[:n], values[:n])
    keep = fresh % 2 == 1
    cached = jnp.where(keep, values[jnp.maximum(fresh, 0)], 0.0)
    return out.reshape(shape), (block, used, cached, keep)


# ----------------------------------------------------------------------------- one image
def _chw(shape_hwc: tuple[int, int, int]) -> tuple[int, int, int]:
    h, w, c = shape_hwc
    return (c, h, w)


def _split_seed(seed: jax.Array, plus: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The 64-bit ``seed + plus`` (both uint32) as (low, high) words."""
    total = _u32(seed) + _u32(plus)
    return total, (total < _u32(seed)).astype(U32)


def draw(rng: str, shape_hwc: tuple[int, int, int], seed: jax.Array, key: jax.Array | None = None,
         seed_hi: jax.Array | None = None) -> jax.Array:
    """The first ``randn`` of a fresh generator for one image, (h, w, C) float32: ``nv`` and
    ``cpu`` from ``seed`` (uint32; ``seed_hi`` the high word for ``nv``), ``jax`` from
    ``key``."""
    if rng == "jax":
        return jax.random.normal(key, shape_hwc, jnp.float32)
    chw = _chw(shape_hwc)
    if rng == "nv":
        hi = jnp.zeros((), U32) if seed_hi is None else seed_hi
        x = nv_randn(_u32(seed), hi, _u32(0), chw)
    elif rng == "cpu":
        x, _ = cpu_randn(cpu_state(seed), chw)
    else:
        raise ValueError(f"unknown rng {rng!r}; choose one of {', '.join(RNG_NAMES)}")
    return jnp.transpose(x, (1, 2, 0))


def slerp(val: jax.Array, low: jax.Array, high: jax.Array, axis: int = 0) -> jax.Array:
    """The WebUI's ``slerp(val, low, high)`` (modules/rng.py) of one image: both normalised
    along ``axis`` (its torch dim 1, the height: our axis 0 of (h, w, C)), ``dot`` their
    per-column products summed along it; if ``dot.mean() > 0.9995`` it returns
    ``low * val + high * (1 - val)`` (sic), else, with ``omega = acos(dot)``,
    ``sin((1 - val) omega) / sin(omega) * low + sin(val omega) / sin(omega) * high``."""
    low_n = low / jnp.linalg.norm(low, axis=axis, keepdims=True)
    high_n = high / jnp.linalg.norm(high, axis=axis, keepdims=True)
    dot = (low_n * high_n).sum(axis)
    omega = jnp.arccos(dot)
    so = jnp.sin(omega)
    res = (jnp.expand_dims(jnp.sin((1.0 - val) * omega) / so, axis) * low
           + jnp.expand_dims(jnp.sin(val * omega) / so, axis) * high)
    return jnp.where(dot.mean() > 0.9995, low * val + high * (1 - val), res)


def resize_offsets(shape: tuple[int, int], source: tuple[int, int]):
    """The WebUI's placement of the noise drawn at ``source`` (h, w) in one of ``shape``:
    (target rows, target cols, source rows, source cols) as slices."""
    dx = (shape[1] - source[1]) // 2
    dy = (shape[0] - source[0]) // 2
    w = source[1] if dx >= 0 else source[1] + 2 * dx
    h = source[0] if dy >= 0 else source[0] + 2 * dy
    tx, ty = max(dx, 0), max(dy, 0)
    dx, dy = max(-dx, 0), max(-dy, 0)
    return slice(ty, ty + h), slice(tx, tx + w), slice(dy, dy + h), slice(dx, dx + w)


def image_noise(rng: str, shape: tuple[int, int, int], seed: jax.Array, index: jax.Array,
                key: jax.Array, variation: tuple | None = None,
                resize_from: tuple[int, int] | None = None) -> jax.Array:
    """One image's start noise (h, w, C), the WebUI's ``ImageRNG.first``: ``seed``/``index``
    its call seed and index (uint32), ``key`` its ``jax`` key, ``variation`` its (subseed,
    strength, subseed's jax key) or None, ``resize_from`` the latent (h, w) the seed's noise
    is drawn at."""
    on = jnp.bool_(False) if variation is None else variation[1] != 0
    lo, hi = _split_seed(seed, jnp.where(on, _u32(0), index))
    from_shape = shape if resize_from is None else (*resize_from, shape[2])
    noise = draw(rng, from_shape, lo, key, hi)
    if variation is not None:
        subseed, strength, subkey = variation
        sub_lo, sub_hi = _split_seed(subseed, index)
        sub = draw(rng, from_shape, sub_lo, subkey, sub_hi)
        noise = jnp.where(on, slerp(strength, noise, sub), noise)
    if from_shape != shape:
        x = draw(rng, shape, lo, key, hi)
        rows, cols, src_rows, src_cols = resize_offsets(shape[:2], from_shape[:2])
        noise = x.at[rows, cols].set(noise[src_rows, src_cols])
    return noise


def start_noise(rng: str, shape: tuple[int, int, int], seeds: jax.Array, indices: jax.Array,
                inputs: Mapping[str, jax.Array], resize_from: tuple[int, int] | None = None
                ) -> jax.Array:
    """The (B, h, w, C) start noise of a call's images: ``seeds``, ``indices`` (uint32, one per
    image) and, when the call has variation seeds, ``inputs[SUBSEEDS]`` and
    ``inputs[STRENGTH]``."""
    seeds, indices = seeds.astype(U32), indices.astype(U32)
    keys, _ = image_keys(seeds, indices)
    if STRENGTH not in inputs:
        return jax.vmap(lambda s, i, k: image_noise(rng, shape, s, i, k,
                                                    resize_from=resize_from))(seeds, indices, keys)
    subseeds = inputs[SUBSEEDS].astype(U32)
    subkeys, _ = image_keys(subseeds, indices)
    return jax.vmap(lambda s, i, k, *v: image_noise(rng, shape, s, i, k, v, resize_from))(
        seeds, indices, keys, subseeds, inputs[STRENGTH].astype(jnp.float32), subkeys)


# ----------------------------------------------------------------------------- per step
def step_state(rng: str, shape: tuple[int, int, int], seeds: jax.Array, indices: jax.Array,
               inputs: Mapping[str, jax.Array]):
    """The per-image generators the WebUI's samplers draw their per-step noise from, as they
    are after the start noise (``ImageRNG.next`` after ``first``): the seed's generator one
    draw in, or, with an ``eta_noise_seed_delta`` (ENSD) other than 0, a fresh one seeded
    ``seed + ENSD``. A batched pytree for :func:`next_step_noise`."""
    b = seeds.shape[0]
    strength = inputs.get(STRENGTH, jnp.zeros((b,), jnp.float32))
    ensd = inputs.get(ENSD, jnp.zeros((b,), U32)).astype(U32)
    seeds, indices = seeds.astype(U32), indices.astype(U32)
    if rng == "jax":
        _, step_keys = image_keys(seeds, indices)
        return (step_keys, jnp.zeros((b,), jnp.int32))
    lo, hi = jax.vmap(_split_seed)(seeds, jnp.where(strength != 0, _u32(0), indices))
    # seed + ENSD as the WebUI adds them (a Python int), from the 64-bit seed.
    lo2 = lo + ensd
    hi2 = hi + (lo2 < lo).astype(U32)
    fresh = ensd != 0
    lo, hi = jnp.where(fresh, lo2, lo), jnp.where(fresh, hi2, hi)
    if rng == "nv":
        return (lo, hi, jnp.where(fresh, 0, 1).astype(jnp.int32))
    if math.prod(shape) < 16:
        raise ValueError("per-step cpu noise needs latents of 16 or more values")

    def one(seed, skip):
        state = cpu_state(seed)
        _, after = cpu_randn(state, _chw(shape))
        return jax.tree.map(lambda a, b: jnp.where(skip, a, b), after, state)
    return jax.vmap(one)(lo, ~fresh)


def next_step_noise(rng: str, shape: tuple[int, int, int], state):
    """(the next per-step noise (B, h, w, C), the state after) from :func:`step_state`'s
    state; each call is the WebUI's ``ImageRNG.next()`` (k-diffusion's ``randn_like``)."""
    if rng == "jax":
        keys, k = state
        x = jax.vmap(lambda key, i: jax.random.normal(jax.random.fold_in(key, i), shape,
                                                      jnp.float32))(keys, k)
        return x, (keys, k + 1)
    if rng == "nv":
        lo, hi, offset = state
        x = jax.vmap(lambda a, b, o: nv_randn(a, b, _u32(o), _chw(shape)))(lo, hi, offset)
        return jnp.transpose(x, (0, 2, 3, 1)), (lo, hi, offset + 1)
    x, state = jax.vmap(lambda s: cpu_randn(s, _chw(shape)))(state)
    return jnp.transpose(x, (0, 2, 3, 1)), state


def step_noise(rng: str, shape: tuple[int, int, int], seeds: jax.Array, indices: jax.Array,
               inputs: Mapping[str, jax.Array], k: jax.Array) -> jax.Array:
    """The per-step noise (B, h, w, C) of draw ``k`` (traced, from 0) of a sampling run:
    :func:`next_step_noise` called ``k + 1`` times on :func:`step_state`. ``jax`` and ``nv``
    compute it directly; ``cpu`` advances MT19937 through the ``k`` draws before it (a loop
    of k draws: carry :func:`step_state` through the sampler's loop instead where that
    matters)."""
    state = step_state(rng, shape, seeds, indices, inputs)
    if rng == "jax":
        keys, _ = state
        return next_step_noise(rng, shape, (keys, jnp.broadcast_to(k, keys.shape[:1])))[0]
    if rng == "nv":
        lo, hi, offset = state
        return next_step_noise(rng, shape, (lo, hi, offset + k))[0]
    state = jax.lax.fori_loop(0, k, lambda _, s: next_step_noise(rng, shape, s)[1], state)
    return next_step_noise(rng, shape, state)[0]
