"""The benchmark's FLOP count (benchmarks/flops.py), counted from the traced program so every
backend gets one, against XLA's own cost analysis on CPU."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from benchmarks.flops import count_flops
from benchmarks.models import SHAPES
from sdjax.models.clip_text import CLIPTextModel
from sdjax.models.unet import UNet2DConditionModel
from sdjax.models.vae import AutoencoderKL

sds = jax.ShapeDtypeStruct


def _abstract_apply(make, method=None):
    """(apply(state, *inputs), abstract state) of a network built without initialising any
    weight."""
    graphdef, state = nnx.split(nnx.eval_shape(make))

    def apply(state, *inputs):
        module = nnx.merge(graphdef, state)
        return (getattr(module, method) if method else module)(*inputs)

    return apply, jax.tree.map(lambda x: sds(x.shape, x.dtype), state)


def _tiny_networks(dtype):
    s = SHAPES["tiny"]
    ctx = s.unet.cross_attention_dim
    return {
        "text_encoder": (lambda: CLIPTextModel(s.text, dtype=dtype, rngs=nnx.Rngs(0)), None,
                         (sds((2, 77), jnp.int32),)),
        "unet": (lambda: UNet2DConditionModel(s.unet, dtype=dtype, rngs=nnx.Rngs(0)), None,
                 (sds((2, 8, 8, 4), dtype), sds((2,), jnp.float32), sds((2, 77, ctx), dtype))),
        "vae_decode": (lambda: AutoencoderKL(s.vae, dtype=dtype, rngs=nnx.Rngs(0)), "decode",
                       (sds((1, 8, 8, 4), dtype),)),
    }


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("network", ["text_encoder", "unet", "vae_decode"])
def test_count_matches_xla_on_cpu(network, dtype):
    make, method, inputs = _tiny_networks(dtype)[network]
    apply, state = _abstract_apply(make, method)
    ours = count_flops(apply, state, *inputs)
    xla = jax.jit(apply).lower(state, *inputs).cost_analysis()["flops"]
    # Measured equal to 0.2% (SD 1.5 at 512x512: 1577.58 against 1577.57 GFLOP per UNet call).
    assert ours == pytest.approx(xla, rel=0.01)


def test_convolution_counts_only_taps_inside_the_image():
    # 3x3, padding 1, on 4x4: per dimension 4 outputs x 3 taps less the 2 on the border.
    x, k = sds((1, 4, 4, 2), jnp.float32), sds((3, 3, 2, 5), jnp.float32)

    def conv(x, k):
        return jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    assert count_flops(conv, x, k) == 2 * 5 * 2 * (4 * 3 - 2) ** 2


def test_scan_counts_its_body_per_iteration():
    a = sds((16, 16), jnp.float32)

    def ten_matmuls(a):
        return jax.lax.scan(lambda c, _: (c @ a, None), a, length=10)[0]

    assert count_flops(ten_matmuls, a) == 10 * 2 * 16 ** 3
