"""One benchmark workload, shared by the JAX process and its children (warm start, diffusers)
so all of them run exactly the same prompts, starting noise and settings."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

_PROMPTS = ["a photo of a cat", "a red circle on a blue background", "a city at night",
            "a painting of a dog"]


@dataclasses.dataclass(frozen=True)
class Workload:
    folder: str
    dtype: str
    height: int
    width: int
    steps: int
    batch: int                      # images per call, over all devices
    num_devices: int | None = None  # None: every local device
    scheduler: str | None = None    # None: the model's own
    guidance: float = 7.5
    seed: int = 0
    matmul_precision: str | None = None  # None: sdjax's default for the dtype
    controlnet: str | None = None   # a ControlNet folder: txt2img through it, one control image

    @property
    def full_float32(self) -> bool:
        """float32 at full precision (no TF32 or bfloat16 passes), in both libraries."""
        return self.dtype == "float32" and self.matmul_precision in (None, "highest")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Workload:
        return cls(**json.loads(text))

    def prompts(self) -> list[str]:
        return [_PROMPTS[i % len(_PROMPTS)] for i in range(self.batch)]

    def latent_shape(self) -> tuple[int, int, int, int]:
        """(batch, h, w, channels): NHWC, as sdjax takes them."""
        folder = Path(self.folder)
        unet = json.loads((folder / "unet" / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
        factor = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
        return (self.batch, self.height // factor, self.width // factor,
                unet.get("in_channels", 4))

    def latents(self) -> np.ndarray:
        """Unscaled N(0, 1) starting noise. Both libraries start from these same numbers (each
        multiplies by its scheduler's initial sigma), so their outputs can be compared."""
        return np.random.RandomState(self.seed).randn(*self.latent_shape()).astype(np.float32)

    def control_image(self) -> np.ndarray:
        """A uint8 (H, W, 3) edge-like control image (white lines on black) of the output
        size, the same in both libraries."""
        rng = np.random.RandomState(self.seed + 1)
        lines = np.zeros((self.height, self.width), np.uint8)
        lines[rng.randint(0, self.height, 4), :] = 255
        lines[:, rng.randint(0, self.width, 4)] = 255
        return np.repeat(lines[..., None], 3, axis=-1)

    def sdjax_kwargs(self) -> dict:
        control = {} if self.controlnet is None else {"control_image": self.control_image()}
        return dict(negative_prompt="", num_inference_steps=self.steps,
                    guidance_scale=self.guidance, height=self.height, width=self.width,
                    latents=self.latents(), scheduler=self.scheduler, output_type="float",
                    **control)
