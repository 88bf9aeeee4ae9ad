"""The WebUI's samplers against sdjax's diffusers-named schedulers at the same step count:
the claim to check is that the same number of UNet evaluations costs the same time (every
sampler is one compiled loop whose step is a handful of scaled adds).

    python -m benchmarks.webui_samplers_speed --model toy --steps 20 --repeats 5

For each pair (WebUI sampler, its diffusers-named peer) it reports the UNet evaluations of
each at ``--steps`` and the median time of warm ``latent`` calls (compile excluded; the calls
of a pair alternate, so load on the machine hits both alike), and their ratio. Prints one
markdown table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

# (the WebUI's sampler, sdjax's diffusers-named scheduler doing the same kind of step)
PAIRS = (("Euler", "euler"), ("Euler a", "euler_a"), ("DPM++ 2M", "dpmpp_2m_karras"),
         ("LMS", "lms"), ("Heun", "heun"), ("DDIM", "ddim"), ("PLMS", "pndm"),
         ("LCM", "lcm"), ("DPM++ SDE", "heun"), ("DPM++ 2M SDE", "dpmpp_2m"),
         ("DPM fast", "euler"), ("UniPC", "dpmpp_2m"), ("DDIM CFG++", "ddim"),
         ("Restart", "heun"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="toy", help="a benchmarks.models shape, 'toy' or a folder")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=None, help="pixels (default: the model's)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--only", nargs="+", default=None, metavar="SAMPLER",
                   help="time only these WebUI samplers (default: all)")
    a = p.parse_args(argv)

    import jax

    from benchmarks import hardware, models
    from sdjax.pipeline import StableDiffusionPipeline
    from sdjax.schedulers import ALL_SCHEDULER_NAMES, get_scheduler

    model = a.model
    if model in models.NAMES:
        model = str(models.ensure_folder(model))
    pipe = StableDiffusionPipeline.from_pretrained(model, dtype="float32", num_devices=1)
    h, w = (a.size, a.size) if a.size else pipe.default_hw
    config = pipe.scheduler_config

    def evaluations(name):
        sched = get_scheduler(name, config)
        return sched.num_evaluations(sched.set_timesteps(a.steps))

    def call(name):
        return lambda: jax.block_until_ready(pipe(
            "a red circle on a blue background", num_inference_steps=a.steps, height=h,
            width=w, seed=0, scheduler=name, output_type="latent").images)

    rows = []
    for webui, peer in PAIRS:
        if a.only and webui not in a.only:
            continue
        if webui not in ALL_SCHEDULER_NAMES or peer is None:
            rows.append({"webui": webui, "peer": peer, "note": "not built"})
            continue
        fns = {webui: call(webui), peer: call(peer)}
        for fn in fns.values():
            fn()  # compile and warm up
        times = {webui: [], peer: []}
        for _ in range(a.repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        tw, tp = (statistics.median(times[n]) for n in (webui, peer))
        ew, ep = evaluations(webui), evaluations(peer)
        rows.append({"webui": webui, "peer": peer, "webui_evals": ew, "peer_evals": ep,
                     "webui_s": round(tw, 4), "peer_s": round(tp, 4),
                     "time_ratio": round(tw / tp, 3),
                     "per_eval_ratio": round((tw / ew) / (tp / ep), 3)})
    result = {"device": hardware.device_kind(), "backend": jax.default_backend(),
              "model": a.model, "size": f"{w}x{h}", "steps": a.steps, "repeats": a.repeats,
              "load_avg": hardware.load_average(), "rows": rows}
    print("| WebUI sampler | peer | UNet evals (WebUI / peer) | median s (WebUI / peer) "
          "| time ratio | per-evaluation ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "note" in r:
            print(f"| {r['webui']} | {r['peer'] or '-'} | {r['note']} | | | |")
            continue
        print(f"| {r['webui']} | {r['peer']} | {r['webui_evals']} / {r['peer_evals']} | "
              f"{r['webui_s']} / {r['peer_s']} | {r['time_ratio']} | {r['per_eval_ratio']} |")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
