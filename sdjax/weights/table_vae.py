"""diffusers ``AutoencoderKL`` keys -> our AutoencoderKL.

Old diffusers VAEs named the mid-block attention ``query/key/value/proj_attn`` and stored it
as 1x1 convs; both spellings are accepted (``dense`` takes either weight layout)."""

from sdjax.weights.loader import Rule, conv, dense, identity

_CONVS = r"(conv_in|conv_out|conv1|conv2|conv_shortcut|conv|quant_conv|post_quant_conv)"
_ATTN = r"(encoder|decoder)\.mid_block\.attentions\.0\."

RULES = [
    Rule(_ATTN + r"(to_q|query)\.weight", r"\1.mid_block.attentions.0.to_q.kernel", dense),
    Rule(_ATTN + r"(to_k|key)\.weight", r"\1.mid_block.attentions.0.to_k.kernel", dense),
    Rule(_ATTN + r"(to_v|value)\.weight", r"\1.mid_block.attentions.0.to_v.kernel", dense),
    Rule(_ATTN + r"(to_out\.0|proj_attn)\.weight", r"\1.mid_block.attentions.0.to_out.kernel",
         dense),
    Rule(_ATTN + r"(to_q|query)\.bias", r"\1.mid_block.attentions.0.to_q.bias"),
    Rule(_ATTN + r"(to_k|key)\.bias", r"\1.mid_block.attentions.0.to_k.bias"),
    Rule(_ATTN + r"(to_v|value)\.bias", r"\1.mid_block.attentions.0.to_v.bias"),
    Rule(_ATTN + r"(to_out\.0|proj_attn)\.bias", r"\1.mid_block.attentions.0.to_out.bias"),
    Rule(r"(.*\b" + _CONVS + r")\.weight", r"\1.kernel", conv),
    Rule(r"(.*\b" + _CONVS + r")\.bias", r"\1.bias", identity),
    Rule(r"(.*\b(?:norm1|norm2|conv_norm_out|group_norm))\.weight", r"\1.scale"),
    Rule(r"(.*\b(?:norm1|norm2|conv_norm_out|group_norm))\.bias", r"\1.bias"),
]
