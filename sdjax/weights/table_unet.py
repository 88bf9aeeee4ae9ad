"""diffusers ``UNet2DConditionModel`` keys -> our UNet2DConditionModel.

Our module tree mirrors diffusers', so most rules only rename the leaf (weight -> kernel or
scale) and change the layout. Two names differ: ``to_out.0`` (a ModuleList with dropout in
diffusers) is ``to_out``, and the GEGLU feed-forward ``ff.net.0.proj``/``ff.net.2`` is
``ff.geglu``/``ff.out``. ``proj_in``/``proj_out`` are 1x1 convs in SD1 checkpoints and linears
in SD2 ones; ``dense`` takes both."""

from sdjax.weights.loader import Rule, conv, dense, identity

_BLOCK = r"(down_blocks\.\d+|up_blocks\.\d+|mid_block)"
_RESNET = _BLOCK + r"\.resnets\.(\d+)\."
_ATTN = _BLOCK + r"\.attentions\.(\d+)\."
_TBLOCK = _ATTN + r"transformer_blocks\.(\d+)\."
_T = r"\1.attentions.\2.transformer_blocks.\3."

RULES = [
    Rule(r"conv_(in|out)\.weight", r"conv_\1.kernel", conv),
    Rule(r"conv_(in|out)\.bias", r"conv_\1.bias"),
    Rule(r"(time_embedding|add_embedding)\.(linear_[12])\.weight", r"\1.\2.kernel", dense),
    Rule(r"(time_embedding|add_embedding)\.(linear_[12])\.bias", r"\1.\2.bias"),
    Rule(r"class_embedding\.weight", "class_embedding.embedding"),
    Rule(r"conv_norm_out\.weight", "conv_norm_out.scale"),
    Rule(r"conv_norm_out\.bias", "conv_norm_out.bias"),
    # ResnetBlock2D
    Rule(_RESNET + r"(norm[12])\.weight", r"\1.resnets.\2.\3.scale"),
    Rule(_RESNET + r"(conv[12]|conv_shortcut)\.weight", r"\1.resnets.\2.\3.kernel", conv),
    Rule(_RESNET + r"time_emb_proj\.weight", r"\1.resnets.\2.time_emb_proj.kernel", dense),
    Rule(_RESNET + r"(norm[12]|conv[12]|conv_shortcut|time_emb_proj)\.bias",
         r"\1.resnets.\2.\3.bias"),
    # Transformer2DModel
    Rule(_ATTN + r"norm\.weight", r"\1.attentions.\2.norm.scale"),
    Rule(_ATTN + r"(proj_in|proj_out)\.weight", r"\1.attentions.\2.\3.kernel", dense),
    Rule(_ATTN + r"(norm|proj_in|proj_out)\.bias", r"\1.attentions.\2.\3.bias"),
    # BasicTransformerBlock
    Rule(_TBLOCK + r"(norm[123])\.weight", _T + r"\4.scale"),
    Rule(_TBLOCK + r"(norm[123])\.bias", _T + r"\4.bias"),
    Rule(_TBLOCK + r"(attn[12])\.(to_[qkv])\.weight", _T + r"\4.\5.kernel", dense),
    Rule(_TBLOCK + r"(attn[12])\.to_out\.0\.weight", _T + r"\4.to_out.kernel", dense),
    Rule(_TBLOCK + r"(attn[12])\.to_out\.0\.bias", _T + r"\4.to_out.bias"),
    Rule(_TBLOCK + r"ff\.net\.0\.proj\.weight", _T + "ff.geglu.kernel", dense),
    Rule(_TBLOCK + r"ff\.net\.0\.proj\.bias", _T + "ff.geglu.bias"),
    Rule(_TBLOCK + r"ff\.net\.2\.weight", _T + "ff.out.kernel", dense),
    Rule(_TBLOCK + r"ff\.net\.2\.bias", _T + "ff.out.bias"),
    # Down/upsampler convs
    Rule(r"(down_blocks\.\d+\.downsamplers|up_blocks\.\d+\.upsamplers)\.0\.conv\.weight",
         r"\1.0.conv.kernel", conv),
    Rule(r"(down_blocks\.\d+\.downsamplers|up_blocks\.\d+\.upsamplers)\.0\.conv\.bias",
         r"\1.0.conv.bias", identity),
]
