"""diffusers ``ControlNetModel`` keys -> our ControlNetModel: the UNet's rules for the encoder
it shares (conv_in, the time and added embeddings, down blocks, mid block), and the
conditioning embedding's and the zero convolutions' own."""

from sdjax.weights import table_unet
from sdjax.weights.loader import Rule, conv

_CONVS = (r"(controlnet_cond_embedding\.(?:conv_in|conv_out|blocks\.\d+)"
          r"|controlnet_down_blocks\.\d+|controlnet_mid_block)")

RULES = [
    Rule(_CONVS + r"\.weight", r"\1.kernel", conv),
    Rule(_CONVS + r"\.bias", r"\1.bias"),
    *table_unet.RULES,
]
