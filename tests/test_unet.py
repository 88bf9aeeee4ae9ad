"""UNet2DConditionModel: parity with diffusers on tiny random models, strict loading, configs.

Reproduce the numbers: ``pytest tests/test_unet.py -q -rP`` prints the reached errors.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sdjax.models.layers import attention
from sdjax.models.unet import UNet2DConditionModel, UNetConfig
from sdjax.weights.errors import WeightsError
from sdjax.weights.loader import load_state
from sdjax.weights.safetensors_io import SafetensorsFile
from sdjax.weights.table_unet import RULES

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

F32_TOL = 1e-4   # max abs error / max abs reference, float32
BF16_TOL = 5e-2  # same measure, bfloat16 model vs float32 model

# Tiny configs. SD1-like and SD2-like keep the structure of the real ones (block types, head
# semantics, projection layout); "options" exercises the config switches SD1/2 leave at their
# defaults, an odd latent size with downsample_padding=0 and a scalar timestep.
TINY = {
    "sd1": dict(
        config=dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=2,
                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8),
        latent=(4, 4, 16, 16), tokens=7, timesteps=[1.0, 500.0, 999.0, 261.75]),
    "sd2": dict(
        config=dict(sample_size=16, block_out_channels=(32, 64, 64), layers_per_block=1,
                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                      "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                    cross_attention_dim=48, attention_head_dim=[2, 4, 4], norm_num_groups=16,
                    use_linear_projection=True, upcast_attention=True,
                    transformer_layers_per_block=2),
        latent=(4, 4, 9, 14), tokens=5, timesteps=[1.0, 500.0, 999.0, 0.5]),
    "options": dict(
        config=dict(sample_size=8, in_channels=3, out_channels=5, block_out_channels=(16, 32),
                    layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=24,
                    attention_head_dim=4, norm_num_groups=4, norm_eps=1e-6,
                    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
                    center_input_sample=True, mid_block_scale_factor=2.0,
                    time_embedding_dim=40, conv_in_kernel=1, conv_out_kernel=5),
        latent=(2, 3, 7, 10), tokens=3, timesteps=250.5),
}


def _torch_unet(config: dict):
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(**config).eval()
    # diffusers zero-initialises conv_out and proj_out and sets norms to identity; noise on
    # every parameter makes each one matter to the output.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _jit_apply(model: UNet2DConditionModel):
    graphdef, state = nnx.split(model)

    @jax.jit
    def apply(state, x, t, c):
        return nnx.merge(graphdef, state)(x, t, c)

    return lambda x, t, c: np.asarray(apply(state, x, t, c), np.float32)


def _run(apply, x_nchw: np.ndarray, t, c: np.ndarray) -> np.ndarray:
    out = apply(jnp.asarray(x_nchw.transpose(0, 2, 3, 1)), jnp.asarray(t, jnp.float32),
                jnp.asarray(c))
    return out.transpose(0, 3, 1, 2)


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny(request, tmp_path_factory):
    """A saved random diffusers UNet, its inputs and its reference output."""
    spec = TINY[request.param]
    model = _torch_unet(spec["config"])
    folder = tmp_path_factory.mktemp(f"unet_{request.param}")
    model.save_pretrained(folder)
    rng = np.random.RandomState(0)
    x = rng.randn(*spec["latent"]).astype(np.float32)
    c = rng.randn(spec["latent"][0], spec["tokens"],
                  spec["config"]["cross_attention_dim"]).astype(np.float32)
    t = spec["timesteps"]
    with torch.no_grad():
        ref = model(torch.tensor(x), torch.tensor(t), torch.tensor(c)).sample.numpy()
    cfg = UNetConfig.from_dict(json.loads((folder / "config.json").read_text()))
    tensors = SafetensorsFile(folder / "diffusion_pytorch_model.safetensors")
    return dict(name=request.param, cfg=cfg, tensors=tensors, x=x, t=t, c=c, ref=ref)


def _load(cfg: UNetConfig, tensors, dtype=jnp.float32) -> UNet2DConditionModel:
    abstract = nnx.eval_shape(lambda: UNet2DConditionModel(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    return load_state(abstract, tensors, RULES, what="unet")


def test_float32_parity_with_diffusers(tiny):
    model = _load(tiny["cfg"], tiny["tensors"])
    out = _run(_jit_apply(model), tiny["x"], tiny["t"], tiny["c"])
    assert out.shape == tiny["ref"].shape
    err = _rel(out, tiny["ref"])
    print(f"{tiny['name']}: float32 max abs err / max abs ref = {err:.2e}")
    assert err < F32_TOL


@pytest.mark.parametrize("tiny", ["sd1"], indirect=True)
def test_residuals_parity_with_diffusers(tiny):
    """The ControlNet entry point: residuals added to every skip and to the mid block's
    output give diffusers' down_block_additional_residuals / mid_block_additional_residual
    numbers."""
    model = _load(tiny["cfg"], tiny["tensors"])
    torch_model = _torch_unet(TINY["sd1"]["config"])
    x, t, c = tiny["x"], tiny["t"], tiny["c"]
    # The skips: conv_in's output, then each down block's resnets and downsampler.
    rng = np.random.RandomState(1)
    h, w = x.shape[2:]
    shapes = [(32, h, w)] * 3 + [(32, h // 2, w // 2)] + [(64, h // 2, w // 2)] * 2
    down = [rng.randn(x.shape[0], *s).astype(np.float32) for s in shapes]
    mid = rng.randn(x.shape[0], 64, h // 2, w // 2).astype(np.float32)
    with torch.no_grad():
        ref = torch_model(torch.tensor(x), torch.tensor(t), torch.tensor(c),
                          down_block_additional_residuals=tuple(torch.tensor(d) for d in down),
                          mid_block_additional_residual=torch.tensor(mid)).sample.numpy()
    graphdef, state = nnx.split(model)

    @jax.jit
    def apply(state, x, t, c, down, mid):
        return nnx.merge(graphdef, state)(x, t, c, down_residuals=down, mid_residual=mid)

    nhwc = [jnp.asarray(d.transpose(0, 2, 3, 1)) for d in down]
    out = np.asarray(apply(state, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t),
                           jnp.asarray(c), nhwc, jnp.asarray(mid.transpose(0, 2, 3, 1))))
    out = out.transpose(0, 3, 1, 2)
    assert np.abs(ref - tiny["ref"]).max() > 1e-2  # the residuals matter
    err = _rel(out, ref)
    print(f"residuals: float32 max abs err / max abs ref = {err:.2e}")
    assert err < F32_TOL


@pytest.mark.parametrize("tiny", ["sd1"], indirect=True)  # one bfloat16 compile is enough
def test_bfloat16_close_to_float32(tiny):
    model = _load(tiny["cfg"], tiny["tensors"], dtype=jnp.bfloat16)
    kernel = model.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.kernel
    assert kernel[...].dtype == jnp.bfloat16
    out = _run(_jit_apply(model), tiny["x"], tiny["t"], tiny["c"])
    assert np.isfinite(out).all()
    # Against diffusers' float32 output, which our float32 run matches to ~1e-6.
    err = _rel(out, tiny["ref"])
    print(f"bfloat16 vs float32: max abs err / max abs ref = {err:.2e}")
    assert err < BF16_TOL


def test_attention_logits_stay_float32_for_half_inputs():
    # What upcast_attention asks for: jax.nn.dot_product_attention's XLA path must compute the
    # QK^T logits in float32 even for bfloat16/float16 inputs (checked on the traced program, so
    # a JAX upgrade that changes this fails here).
    for dtype in (jnp.bfloat16, jnp.float16):
        q = jnp.ones((1, 6, 16), dtype)
        jaxpr = jax.make_jaxpr(lambda q: attention(q, q, q, 2))(q).jaxpr
        dots = [e for e in _equations(jaxpr) if e.primitive.name == "dot_general"]
        assert len(dots) == 2, dots  # QK^T, then PV
        assert dots[0].outvars[0].aval.dtype == jnp.float32, dtype


def _equations(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", None)  # pjit and friends nest a ClosedJaxpr
            if inner is not None:
                yield from _equations(inner)


# --- strict loading --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd1_weights(tmp_path_factory):
    model = _torch_unet(TINY["sd1"]["config"])
    cfg = UNetConfig.from_dict(dict(model.config))
    return cfg, {k: v.numpy() for k, v in model.state_dict().items()}


def test_every_key_maps(sd1_weights):
    cfg, tensors = sd1_weights
    model = _load(cfg, tensors)
    n_ours = sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n_ours == sum(v.size for v in tensors.values())


def test_missing_key_is_named(sd1_weights):
    cfg, tensors = sd1_weights
    tensors = dict(tensors)
    del tensors["up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2.weight"]
    with pytest.raises(WeightsError, match=r"up_blocks\.1\.attentions\.0\.transformer_blocks"
                                           r"\.0\.ff\.out\.kernel"):
        _load(cfg, tensors)


@pytest.mark.parametrize("key", ["not_a_unet.weight", "down_blocks.0.resnets.9.conv1.weight"])
def test_unexpected_key_is_named(sd1_weights, key):
    cfg, tensors = sd1_weights
    tensors = dict(tensors, **{key: np.zeros((3,), np.float32)})
    with pytest.raises(WeightsError, match=key.replace(".", r"\.")):
        _load(cfg, tensors)


def test_wrong_shape_is_named(sd1_weights):
    cfg, tensors = sd1_weights
    key = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    tensors = dict(tensors, **{key: np.zeros((64, 31), np.float32)})
    with pytest.raises(WeightsError, match=key.replace(".", r"\.")):
        _load(cfg, tensors)


# --- configs ---------------------------------------------------------------------------------

_SD_COMMON = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
}
# runwayml/stable-diffusion-v1-5 unet/config.json
SD15_CONFIG = dict(_SD_COMMON, _diffusers_version="0.6.0", attention_head_dim=8,
                   cross_attention_dim=768, sample_size=64)
# stabilityai/stable-diffusion-2-1 unet/config.json
SD21_CONFIG = dict(_SD_COMMON, _diffusers_version="0.10.0.dev0",
                   attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                   dual_cross_attention=False, num_class_embeds=None,
                   only_cross_attention=False, sample_size=96, upcast_attention=True,
                   use_linear_projection=True)


def test_presets_match_real_configs():
    assert UNetConfig.sd15() == UNetConfig.from_dict(SD15_CONFIG)
    assert UNetConfig.sd21() == UNetConfig.from_dict(SD21_CONFIG)
    # diffusers' naming quirk: attention_head_dim holds the number of heads.
    assert UNetConfig.sd15().heads_per_level() == (8, 8, 8, 8)
    assert UNetConfig.sd21().heads_per_level() == (5, 10, 20, 20)
    assert UNetConfig.from_dict(dict(SD21_CONFIG, num_attention_heads=4)).heads_per_level() == (
        4, 4, 4, 4)


def test_sd15_parameter_count():
    abstract = nnx.eval_shape(lambda: UNet2DConditionModel(UNetConfig.sd15(), rngs=nnx.Rngs(0)))
    assert sum(v.size for v in jax.tree.leaves(nnx.state(abstract, nnx.Param))) == 859_520_964
    attn = abstract.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert attn.heads == 8 and attn.to_q.kernel.shape == (320, 320)


def test_sdxl_base_parameter_count():
    """As stabilityai/stable-diffusion-xl-base-1.0's UNet (2.57 B parameters)."""
    from sdjax.weights.diffusers_folder import _ShapeOnlyRngs  # the loader's fast abstract build

    abstract = nnx.eval_shape(lambda: UNet2DConditionModel(UNetConfig.sdxl_base(),
                                                           rngs=_ShapeOnlyRngs()))
    assert sum(v.size for v in jax.tree.leaves(nnx.state(abstract, nnx.Param))) == 2_567_463_684
    mid = abstract.mid_block.attentions[0]
    assert len(mid.transformer_blocks) == 10 and mid.transformer_blocks[0].attn1.heads == 20
    assert abstract.add_embedding.linear_1.kernel.shape == (2816, 1280)


@pytest.mark.parametrize("key,value", [
    ("class_embed_type", "timestep"),
    ("class_embeddings_concat", True),  # num_class_embeds alone is supported (x4 upscaler)
    ("addition_embed_type", "text_image"),
    ("addition_embed_type", "text_time"),  # without its time-id and projection widths
    ("time_cond_proj_dim", 256),
    ("encoder_hid_dim", 1024),
    ("resnet_time_scale_shift", "scale_shift"),
    ("attention_type", "gated"),
    ("time_embedding_type", "fourier"),
    ("only_cross_attention", [True]),  # one per level, or one bool
    ("dual_cross_attention", True),
    ("transformer_layers_per_block", [1, 2, 10]),  # one per level
    ("transformer_layers_per_block", [[1, 1], [2, 2], [10, 10], [10, 10]]),  # per layer
    ("cross_attention_dim", [768, 768, 768, 768]),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("mid_block_type", None),
    ("norm_num_groups", None),
    ("up_block_types", ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                        "SimpleCrossAttnUpBlock2D"]),
    ("act_fn", "gelu"),
    ("frobnicate", 1),
])
def test_unsupported_config_raises(key, value):
    with pytest.raises(ValueError, match=key):
        UNetConfig.from_dict(dict(SD15_CONFIG, **{key: value}))


def test_other_model_class_is_refused():
    with pytest.raises(ValueError, match="_class_name"):
        UNetConfig.from_dict(dict(SD15_CONFIG, _class_name="UNet2DModel"))
