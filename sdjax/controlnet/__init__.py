"""ControlNet (Zhang et al. 2023): the network is ``sdjax.models.controlnet``, its files
``sdjax.weights.controlnet_files``; a call's ControlNet arguments become runtime inputs
(``sdjax.controlnet.inputs``) that a residual source reads inside the sampling loop
(``sdjax.controlnet.source``). ``pipe.load_controlnet`` / ``from_pretrained(controlnet=...)``
attach them (``sdjax.controlnet.attach``).
``preprocess(name, image, **params)`` makes control images ("none", "invert", "canny",
"tile_resample", "blur_gaussian", ...: the WebUI extension's preprocessors that need no
network) as the extension does (``sdjax.controlnet.preprocessors``)."""

from sdjax.controlnet.preprocessors import PREPROCESSORS, preprocess  # noqa: E402

__all__ = ["PREPROCESSORS", "preprocess"]
