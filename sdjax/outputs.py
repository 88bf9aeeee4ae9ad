"""What a pipeline call returns: the images (:class:`PipelineOutput`), or while the devices
still compute them a :class:`PendingImages`; and the error for NaN/inf outputs."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from sdjax import parallel, sampling


@dataclasses.dataclass
class PipelineOutput:
    images: np.ndarray  # uint8 (N, H, W, 3); float32 or latents for other output types
    # The seed each image's noise came from: what reproduces it (seed=-1 picks a random one).
    seeds: list[int] = dataclasses.field(default_factory=list)


class NonFiniteError(ValueError):
    """The sampler produced NaN or infinite numbers (the WebUI's "A tensor with all NaNs was
    produced"): NaN weights or inputs, or a float16 overflow."""


class PendingImages:
    """A batch the devices are still computing."""

    def __init__(self, array, n: int, finish=None, seeds: Sequence[int] = ()):
        # With the NaN check on, the compiled call returns (images, one status per image).
        self._array, self._status = array if isinstance(array, tuple) else (array, None)
        self._n, self._finish, self._seeds = n, finish, [int(s) for s in seeds]

    def result(self) -> PipelineOutput:
        images = parallel.fetch(self._array)[:self._n]
        if self._status is not None:
            _raise_if_nonfinite(parallel.fetch(self._status)[:self._n])
        if self._finish is not None:  # host-side post-processing (inpainting's paste-back)
            images = self._finish(images)
        return PipelineOutput(images=images, seeds=self._seeds)


def _raise_if_nonfinite(status: np.ndarray) -> None:
    bad = np.flatnonzero(status)
    if not len(bad):
        return
    where = ("the VAE decoder" if (status[bad] == sampling.NONFINITE_PIXELS).all()
             else "the UNet")
    listed = ", ".join(str(i) for i in bad[:8]) + (" ..." if len(bad) > 8 else "")
    raise NonFiniteError(
        f"a tensor with NaN/inf values was produced in {where} for image(s) {listed} of "
        f"the batch: NaN weights or inputs, or a float16 overflow (try dtype float32 or "
        f"bfloat16); nan_check=False (--no_nan_check) keeps such images")
