"""AutoencoderKL against diffusers on the same random weights."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from sdjax.models.vae import AutoencoderKL, VAEConfig
from sdjax.weights.loader import load_state
from sdjax.weights.table_vae import RULES
from tests.tiny_models import tiny_components

TOL = 1e-4  # max abs error relative to the output's max abs value; reached: ~3e-6


def _rel(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


def _nhwc(x):
    return np.asarray(x, np.float32).transpose(0, 2, 3, 1)


def _load(vae, dtype=jnp.float32, tensors=None):
    cfg = VAEConfig.from_dict(dict(vae.config))
    abstract = nnx.eval_shape(lambda: AutoencoderKL(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    tensors = tensors or {k: v.numpy() for k, v in vae.state_dict().items()}
    return load_state(abstract, tensors, RULES)


@pytest.fixture(scope="module")
def vae_pair():
    _, vae, _ = tiny_components("sd1", seed=4)
    x = np.random.RandomState(0).randn(2, 3, 24, 32).astype(np.float32)
    with torch.no_grad():
        dist = vae.encode(torch.tensor(x)).latent_dist
        z = torch.tensor(np.random.RandomState(1).randn(2, 4, 12, 16).astype(np.float32))
        dec = vae.decode(z).sample.numpy()
    return vae, x, dist.mean.numpy(), dist.logvar.numpy(), z.numpy(), dec


def test_encode_matches_diffusers(vae_pair):
    vae, x, mean, logvar, _, _ = vae_pair
    m, lv = _load(vae).encode(jnp.asarray(_nhwc(x)))
    assert _rel(np.asarray(m), _nhwc(mean)) < TOL
    assert _rel(np.asarray(lv), _nhwc(logvar)) < TOL


def test_decode_matches_diffusers(vae_pair):
    vae, _, _, _, z, dec = vae_pair
    out = np.asarray(_load(vae).decode(jnp.asarray(_nhwc(z))))
    assert out.shape == _nhwc(dec).shape
    assert _rel(out, _nhwc(dec)) < TOL


def test_bfloat16_decode_close_to_float32(vae_pair):
    vae, _, _, _, z, dec = vae_pair
    out = np.asarray(_load(vae, jnp.bfloat16).decode(jnp.asarray(_nhwc(z), jnp.bfloat16)),
                     np.float32)
    assert np.isfinite(out).all()
    assert _rel(out, _nhwc(dec)) < 5e-2


def test_old_attention_key_names_load(vae_pair):
    """Older diffusers/LDM-converted VAEs: query/key/value/proj_attn as 1x1 convs."""
    vae, _, _, _, z, dec = vae_pair
    renamed = {}
    for k, v in vae.state_dict().items():
        v = v.numpy()
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                         ("to_out.0", "proj_attn")):
            if f"attentions.0.{new}." in k:
                k = k.replace(new, old)
                v = v[:, :, None, None] if v.ndim == 2 else v
        renamed[k] = v
    out = np.asarray(_load(vae, tensors=renamed).decode(jnp.asarray(_nhwc(z))))
    assert _rel(out, _nhwc(dec)) < TOL


def test_downsample_factor_follows_the_config():
    assert VAEConfig.sd15().downsample_factor == 8
    assert VAEConfig(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                     up_block_types=("UpDecoderBlock2D",) * 2).downsample_factor == 2


def test_sd15_param_count():
    import jax
    abstract = nnx.eval_shape(lambda: AutoencoderKL(VAEConfig.sd15(), rngs=nnx.Rngs(0)))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))) == 83_653_863
