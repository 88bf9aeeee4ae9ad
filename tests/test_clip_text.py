"""CLIP text encoder against transformers' CLIPTextModel on the same random weights."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from sdjax.models.clip_text import CLIPTextConfig, CLIPTextModel
from sdjax.weights.loader import load_state
from sdjax.weights.table_clip import RULES
from tests.tiny_models import tiny_components

TOL = 1e-5  # max abs error relative to the output's max abs value; reached: ~5e-7


def _load(te, dtype=jnp.float32, prefix=""):
    cfg = CLIPTextConfig.from_dict(te.config.to_dict())
    abstract = nnx.eval_shape(lambda: CLIPTextModel(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    tensors = {prefix + k: v.numpy() for k, v in te.state_dict().items()}
    return load_state(abstract, tensors, RULES)


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def clip_pair(request):
    _, _, te = tiny_components(request.param, seed=3)
    ids = np.random.RandomState(0).randint(0, te.config.vocab_size, (2, 77))
    with torch.no_grad():
        ref = te(torch.tensor(ids)).last_hidden_state.numpy()
    return te, ids, ref


def test_matches_transformers(clip_pair):
    te, ids, ref = clip_pair
    out = np.asarray(_load(te)(jnp.asarray(ids)))
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() / np.abs(ref).max() < TOL


def test_both_key_layouts_give_identical_outputs(clip_pair):
    te, ids, _ = clip_pair
    flat = np.asarray(_load(te)(jnp.asarray(ids)))
    hub = np.asarray(_load(te, prefix="text_model.")(jnp.asarray(ids)))
    np.testing.assert_array_equal(flat, hub)


def test_bfloat16_close_to_float32(clip_pair):
    te, ids, ref = clip_pair
    out = np.asarray(_load(te, jnp.bfloat16)(jnp.asarray(ids)).astype(jnp.float32))
    assert np.isfinite(out).all()
    assert np.abs(out - ref).max() / np.abs(ref).max() < 5e-2


def test_presets_match_the_hub_configs():
    sd15 = {"architectures": ["CLIPTextModel"], "hidden_act": "quick_gelu", "hidden_size": 768,
            "intermediate_size": 3072, "max_position_embeddings": 77,
            "num_attention_heads": 12, "num_hidden_layers": 12, "vocab_size": 49408,
            "projection_dim": 768, "layer_norm_eps": 1e-05}
    sd21 = dict(sd15, hidden_act="gelu", hidden_size=1024, intermediate_size=4096,
                num_attention_heads=16, num_hidden_layers=23, projection_dim=512)
    assert CLIPTextConfig.from_dict(sd15) == CLIPTextConfig.sd15()
    assert CLIPTextConfig.from_dict(sd21) == CLIPTextConfig.sd21()
    sdxl_2 = dict(sd15, hidden_act="gelu", hidden_size=1280, intermediate_size=5120,
                  num_attention_heads=20, num_hidden_layers=32, projection_dim=1280,
                  eos_token_id=2, architectures=["CLIPTextModelWithProjection"])
    assert CLIPTextConfig.from_dict(sdxl_2) == CLIPTextConfig.sdxl_2()
    n = sum(x.size for x in jax_leaves(nnx.eval_shape(
        lambda: CLIPTextModel(CLIPTextConfig.sd15(), rngs=nnx.Rngs(0)))))
    assert n == 123_060_480  # transformers' CLIPTextModel for SD 1.5, position_ids excluded


def jax_leaves(module):
    import jax
    return jax.tree.leaves(nnx.state(module, nnx.Param))


def test_unknown_activation_is_rejected():
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextConfig.from_dict({"hidden_act": "swish"})
