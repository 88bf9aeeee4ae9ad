"""img2img against text-to-image: the same model, size, steps and batch, the same compiled
loop; img2img at ``--strength`` runs only that share of the schedule, so its UNet time should
be about ``strength`` times text-to-image's.

    python -m benchmarks.img2img_speed --model mid --steps 20 --strength 0.5

Times are medians of ``--repeats`` warm calls (compile excluded). ``latent`` calls stop
before the VAE decode, so they are the UNet loop plus the text encoder (and, for img2img, the
VAE encode of the init image); the full calls add the decode. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def _median_seconds(fn, repeats: int) -> float:
    fn()  # compile and warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mid", help="a benchmarks.models shape, 'toy' or a folder")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--strength", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=None, help="pixels (default: the model's)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)

    import jax

    from benchmarks import hardware, models
    from sdjax.pipeline import StableDiffusionPipeline
    from sdjax.schedulers.common import start_index

    model = a.model
    if model in models.NAMES:
        model = str(models.ensure_folder(model))
    pipe = StableDiffusionPipeline.from_pretrained(model, dtype=a.dtype, num_devices=1)
    h, w = (a.size, a.size) if a.size else pipe.default_hw
    init = np.random.RandomState(0).randint(0, 256, (h, w, 3)).astype(np.uint8)
    prompts = ["a red circle on a blue background"] * a.batch
    common = dict(num_inference_steps=a.steps, height=h, width=w, seed=0)
    result = {"device": hardware.device_kind(), "model": a.model, "size": f"{w}x{h}",
              "steps": a.steps, "strength": a.strength, "batch": a.batch, "dtype": a.dtype,
              "img2img_steps": a.steps - start_index(a.steps, a.strength),
              "load_avg": hardware.load_average()}
    for output in ("latent", "uint8"):
        t2i = _median_seconds(lambda o=output: pipe(prompts, output_type=o, **common).images,
                              a.repeats)
        i2i = _median_seconds(lambda o=output: pipe(prompts, image=init, strength=a.strength,
                                                    output_type=o, **common).images, a.repeats)
        result[f"txt2img_{output}_s"] = round(t2i, 4)
        result[f"img2img_{output}_s"] = round(i2i, 4)
        result[f"ratio_{output}"] = round(i2i / t2i, 3)
    result["backend"] = jax.default_backend()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
