"""The training loop: one jitted step (compiled once per recipe, state buffers donated),
data-parallel over sdjax.parallel's mesh (weights replicated, each batch sharded on its first
axis, gradients averaged by the compiler), checkpoints, a progress bar and a JSONL log."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from tqdm import tqdm

from sdjax import parallel
from sdjax.runtime import resolve_matmul_precision
from sdjax.train import (
    autoencoder,
    contrastive,
    controlnet,
    diffusion,
    lora,
    textual_inversion,
)
from sdjax.train.checkpoint import Checkpoints
from sdjax.train.config import OptimConfig, TrainConfig, to_dict
from sdjax.train.data import batches, make_source
from sdjax.train.optim import applied_update, ema_update, learning_rate, optimizer
from sdjax.train.task import Setup
from sdjax.train.validate import check_config

SETUPS: dict[str, Callable[[TrainConfig, Callable], Setup]] = {
    "unet": diffusion.setup, "vae": autoencoder.setup, "clip": contrastive.setup,
    "textual_inversion": textual_inversion.setup, "lora": lora.setup,
    "controlnet": controlnet.setup,
}


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything static about the step. Equal specs share one compiled executable."""
    task: Any
    optim: OptimConfig
    total_steps: int
    ema_decay: float | None
    seed: int
    precision: str | None = None  # of every dot and convolution (resolve_matmul_precision)


def _step(spec: StepSpec, state: dict, frozen: dict, batch: dict) -> tuple[dict, dict]:
    # The precision applies while the step is traced, so it reaches every dot and
    # convolution of the forward and backward passes.
    with jax.default_matmul_precision(spec.precision):
        return _traced_step(spec, state, frozen, batch)


def _traced_step(spec: StepSpec, state: dict, frozen: dict, batch: dict) -> tuple[dict, dict]:
    tx = optimizer(spec.optim, spec.total_steps)
    k = spec.optim.accumulate_steps
    # Randomness (noise, timesteps, latent samples) is a function of the micro-step, so a
    # resumed run draws what the uninterrupted one would have.
    key = jax.random.fold_in(jax.random.key(spec.seed), state["step"])
    (loss, metrics), grads = jax.value_and_grad(spec.task.loss, has_aux=True)(
        state["params"], frozen, batch, key)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
    if spec.ema_decay is not None:
        ema = ema_update(state["ema"], params, spec.ema_decay, state["step"] // k)
        done = applied_update(spec.optim, opt_state)
        new["ema"] = jax.tree.map(lambda e, old: jnp.where(done, e, old), ema, state["ema"])
    lr = learning_rate(spec.optim, spec.total_steps)(state["step"] // k)
    return new, {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads), "lr": lr}


_COMPILED: dict[tuple[StepSpec, Mesh], Callable] = {}


def compiled_step(spec: StepSpec, mesh: Mesh) -> Callable:
    """The jitted step for ``spec`` on ``mesh`` (one per distinct pair per process; the spec
    is hashed once here rather than on every call as a static argument would be)."""
    if (spec, mesh) not in _COMPILED:
        _COMPILED[spec, mesh] = jax.jit(lambda s, f, b: _step(spec, s, f, b), donate_argnums=0,
                                        compiler_options=parallel.compiler_options(mesh))
    return _COMPILED[spec, mesh]


@dataclasses.dataclass
class TrainResult:
    step: int
    params: dict           # host numpy, float32
    ema: dict | None
    history: list[dict]    # the log records of this output_dir (resumed runs included)
    export_dir: Path | None


class _Log:
    """log.jsonl of the run. On resume, records past the restored step (written by the
    interrupted run after its last checkpoint) are dropped so the file is one curve."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        kept = []
        if path.exists() and resume_step > 0:
            for line in path.read_text().splitlines():
                rec = json.loads(line)
                if rec.get("step", 0) <= resume_step:
                    kept.append(rec)
        self.records = kept
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, rec: dict) -> None:
        self.records.append(rec)
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")


def _mean_metrics(pending: list[dict]) -> dict[str, float]:
    host = jax.device_get(pending)
    out = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
    out["lr"] = float(host[-1]["lr"])
    return out


def train(cfg: TrainConfig, *, stop_at: int | None = None) -> TrainResult:
    """Run (or resume, when ``output_dir`` has checkpoints) the recipe ``cfg``. ``stop_at``
    ends this invocation after that many optimizer steps (a checkpoint is written there),
    as an interruption would; the export happens only when ``cfg.steps`` is reached.
    The whole recipe is checked first (:class:`~sdjax.train.validate.ConfigError`), before
    anything is created."""
    check_config(cfg, stop_at=stop_at)
    parallel.maybe_initialize_distributed()
    mesh = parallel.make_mesh(cfg.num_devices)
    if cfg.batch_size % mesh.size:
        raise ValueError(f"batch_size {cfg.batch_size} does not split over {mesh.size} devices")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rep = parallel.replicated(mesh)

    def place(a):
        return jax.device_put(a, rep)

    setup = SETUPS[cfg.task](cfg, place)
    tx = optimizer(cfg.optim, cfg.steps)
    state = {"step": place(np.int32(0)), "params": setup.params,
             "opt_state": jax.jit(tx.init, out_shardings=rep)(setup.params)}
    if cfg.ema_decay is not None:
        state["ema"] = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=rep)(
            setup.params)

    ckpt = Checkpoints(out / "checkpoints", cfg.keep_checkpoints)
    k = cfg.optim.accumulate_steps
    position, elapsed = 0, 0.0
    if (latest := ckpt.latest()) is not None:
        state, meta = ckpt.restore(latest, state)
        position, elapsed = int(meta["data_position"]), float(meta["elapsed_s"])
    start = int(state["step"]) // k
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    log = _Log(out / "log.jsonl", start)
    end = min(cfg.steps, stop_at if stop_at is not None else cfg.steps)

    spec = StepSpec(setup.task, cfg.optim, cfg.steps, cfg.ema_decay, cfg.seed,
                    resolve_matmul_precision(cfg.matmul_precision, cfg.compute_dtype))
    step_fn = compiled_step(spec, mesh)
    stream = batches(make_source(cfg.data, cfg.seed), cfg.batch_size, position,
                     setup.prepare, cfg.data.prefetch)
    bar = tqdm(total=cfg.steps, initial=start, disable=not cfg.progress, unit="step",
               dynamic_ncols=True, desc=cfg.task)
    pending: list[dict] = []
    t_last, step_last = time.perf_counter(), start
    try:
        for step in range(start + 1, end + 1):
            for _ in range(k):
                position, host_batch = next(stream)
                batch = {name: parallel.put_batch(a, mesh) for name, a in host_batch.items()}
                state, metrics = step_fn(state, setup.frozen, batch)
                pending.append(metrics)
            bar.update(1)
            if step % cfg.log_every == 0 or step == end:
                rec = _mean_metrics(pending)  # waits for the device: the timing is honest
                pending = []
                now = time.perf_counter()
                rate = (step - step_last) / (now - t_last)
                elapsed += now - t_last
                t_last, step_last = now, step
                log.write({"step": step, **rec, "samples": position,
                           "steps_per_s": round(rate, 3), "elapsed_s": round(elapsed, 1)})
                bar.set_postfix(loss=f"{rec['loss']:.4f}", refresh=False)
            if step % cfg.checkpoint_every == 0 or step == end:
                jax.block_until_ready(state)
                ckpt.save(step, state, {"step": step, "data_position": position,
                                        "elapsed_s": elapsed + time.perf_counter() - t_last})
    finally:
        bar.close()
        stream.close()
        ckpt.close()

    host = jax.device_get(state)
    export_dir = None
    if end == cfg.steps:
        export_dir = Path(cfg.export_dir or out / "export")
        weights = state["ema"] if (cfg.ema_decay is not None and cfg.export_ema) \
            else state["params"]
        setup.export(weights, export_dir)
    return TrainResult(step=end, params=host["params"], ema=host.get("ema"),
                       history=log.records, export_dir=export_dir)
