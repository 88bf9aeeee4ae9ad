"""transformers ``CLIPTextModel``/``CLIPTextModelWithProjection`` keys -> ours.

Hub checkpoints prefix every key with ``text_model.``; transformers 5 saves them flat. The
optional prefix accepts both. ``position_ids`` is a buffer older checkpoints carry."""

from sdjax.weights.loader import Rule, dense, identity

_P = r"(?:text_model\.)?"

RULES = [
    Rule(_P + r"embeddings\.position_ids", ""),
    Rule(_P + r"embeddings\.(token|position)_embedding\.weight",
         r"embeddings.\1_embedding.embedding", identity),
    Rule(_P + r"encoder\.layers\.(\d+)\.(self_attn\.[qkv]_proj|self_attn\.out_proj|mlp\.fc[12])"
         r"\.weight", r"encoder.layers.\1.\2.kernel", dense),
    Rule(_P + r"encoder\.layers\.(\d+)\.(self_attn\.[qkv]_proj|self_attn\.out_proj|mlp\.fc[12])"
         r"\.bias", r"encoder.layers.\1.\2.bias", identity),
    Rule(_P + r"encoder\.layers\.(\d+)\.(layer_norm[12])\.weight", r"encoder.layers.\1.\2.scale"),
    Rule(_P + r"encoder\.layers\.(\d+)\.(layer_norm[12])\.bias", r"encoder.layers.\1.\2.bias"),
    Rule(_P + r"final_layer_norm\.weight", "final_layer_norm.scale"),
    Rule(_P + r"final_layer_norm\.bias", "final_layer_norm.bias"),
    # CLIPTextModelWithProjection (SDXL's text_encoder_2) keeps it outside text_model.
    Rule(r"text_projection\.weight", "text_projection.kernel", dense),
]
