"""python -m sdjax.generate: a dataset of (prompt, image) pairs in webdataset shards.

    python -m sdjax.generate --prompts prompts.jsonl --outdir data/ --images_per_prompt 4

Sample ``i = row * K + k`` (row of the prompt file, k < K = --images_per_prompt) starts from
noise keyed by (--seed, i) only, or by (seed, k) when its row gives its own seed (so such a row
reproduces ``sdjax.sample --prompt P --seed S --num_images K``); the pixels therefore do not
depend on the device count, the job split or on when a shard is made. Shards appear only when
complete, a re-run with the same settings fills in the missing ones, and ``--num_jobs N
--job_index i`` (or the processes of a jax.distributed run) split the shards without a
coordinator. While the devices compute batch k+1, host threads encode and write batch k.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import itertools
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from sdjax.adapter_text import Adapters
from sdjax.call_settings import CallSettings, Size
from sdjax.cli_args import (
    ModelOptions,
    Parser,
    UsageError,
    add_common_arguments,
    add_flag,
    apply_adapters,
    apply_sampling_defaults,
    check_common_args,
    check_outdir,
    image_size,
    resolve_dtype,
    run_main,
)
from sdjax.controlnet import cli as controlnet_cli
from sdjax.dataset import control as control_images
from sdjax.dataset import manifest
from sdjax.dataset.prompts import PromptsInfo, Row, read_rows, scan
from sdjax.dataset.shards import (
    IMAGE_FORMATS,
    Layout,
    encode_image,
    shard_file_index,
    shard_index,
)
from sdjax.dataset.storage import Store, is_url
from sdjax.dataset.verify import bad_shards, verify_dataset
from sdjax.dataset.writer import AsyncShardWriter
from sdjax.handoff import check_schedule, refine
from sdjax.lora_tags import TagLoras, group_by_tags, split_tags
from sdjax.sdxl_cli import (
    add_sdxl_arguments,
    check_sdxl_args,
    check_sdxl_models,
    load_refiner,
    with_refiner,
)
from sdjax.validation import MAX_SEED


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m sdjax.generate",
        description="Generate a dataset of (prompt, image) pairs as resumable webdataset "
                    "shards; devices compute while host threads encode and write.")
    add_common_arguments(p)
    add_flag(p, "prompts", help="(required) prompt file: .txt (one a line), or .jsonl/.csv/"
             ".parquet with a 'prompt' or 'caption' column and optional 'negative_prompt', "
             "'seed' and (with --controlnet) 'control_image', a file name relative to the "
             "prompt file; a local path or an fsspec URL")
    add_flag(p, "outdir", required=True, help="dataset folder (local path, or gs://, s3://… "
             "through fsspec)")
    add_flag(p, "images_per_prompt", type=int, default=1, help="samples per prompt row (K)")
    add_flag(p, "samples_per_shard", type=int, default=1000, help="samples per .tar shard")
    add_flag(p, "format", default="png", choices=sorted(IMAGE_FORMATS), help="image format")
    add_flag(p, "quality", type=int, default=None, help="jpg/webp quality 1-100 (default 95)")
    add_flag(p, "num_jobs", type=int, default=1, help="independent jobs sharing the dataset; "
             "job i makes every N-th shard")
    add_flag(p, "job_index", type=int, default=0, help="this job's index, 0 <= i < num_jobs")
    add_flag(p, "overwrite", action="store_true", help="replace this job's existing shards "
             "even if they were made with other settings")
    add_flag(p, "verify", action="store_true", help="read every shard of --outdir back "
             "against its stats (size, SHA-256, the tar's members), name each that does not "
             "read back, and exit 1 if there is one; generates nothing")
    add_flag(p, "encode_threads", type=int, default=None,
             help="host threads encoding images (default: CPU count, at most 16)")
    add_sdxl_arguments(p)
    controlnet_cli.add_arguments(p, add_flag)  # and the table's control_image column
    return p


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that decides a sample's bytes (the manifest compares these on re-runs):
    the calls' settings, and what the dataset adds around them."""
    call: CallSettings
    dtype: str
    seed: int
    negative_prompt: str
    image_format: str
    quality: int | None
    model_options: ModelOptions = ModelOptions()
    adapters: tuple[str, ...] = ()   # what apply_adapters reported: LoRAs, scales, embeddings
    lora_dir: str | None = None      # where prompts' <lora:name:w> tags are found
    control: dict = dataclasses.field(default_factory=dict)  # control_images.manifest_json
    # The LoRAs and embeddings as the images' PNG text names them (not a manifest setting:
    # what it says follows from the adapters above).
    texts: Adapters | None = dataclasses.field(default=None, compare=False)

    def manifest(self, layout: Layout, prompts: PromptsInfo) -> dict:
        # The keys and their order are those of earlier versions (so their datasets resume);
        # optional settings join only when used, for the same reason.
        sampling, size, sdxl = self.call.sampling, self.call.size, self.call.sdxl
        fields = {"model": self.call.model, "dtype": self.dtype, "steps": sampling.steps,
                  "scheduler": sampling.scheduler, "guidance_scale": sampling.guidance_scale,
                  "height": size.height, "width": size.width, "seed": self.seed,
                  "negative_prompt": self.negative_prompt, "image_format": self.image_format,
                  "quality": self.quality}
        if self.adapters:
            fields["adapters"] = list(self.adapters)
        if sampling.guidance_rescale:
            fields["guidance_rescale"] = sampling.guidance_rescale
        if sampling.guidance_interval is not None:  # text: JSON has no inf
            fields["guidance_interval"] = ",".join(f"{v:g}" for v in sampling.guidance_interval)
        if sampling.clip_skip is not None:
            fields["clip_skip"] = sampling.clip_skip
        if sampling.options:  # --sampler_option
            fields["sampler_options"] = dict(sampling.options)
        if self.lora_dir is not None:
            fields["lora_dir"] = self.lora_dir
        fields.update(self.sdxl_json())
        fields.update(self.hires_json())
        fields.update(self.noise_json())
        if sdxl.refiner is not None:
            fields["refiner"] = sdxl.refiner
        fields.update(self.control)
        options = {k: v for k, v in self.model_options.kwargs().items() if v not in (None, False)}
        return {**fields, **options, "images_per_prompt": layout.images_per_prompt,
                "samples_per_shard": layout.samples_per_shard, "prompt_rows": prompts.num_rows,
                "prompts_sha256": prompts.sha256}

    def hires_json(self) -> dict:
        """--tiling and the --hires_* flags given (none when unused, so older datasets
        resume)."""
        out = {"tiling": True} if self.call.tiling else {}
        return {**out, **(self.call.hires.flags() if self.call.hires is not None else {})}
    def noise_json(self) -> dict:
        """The noise flags given (sdjax.noise), by flag name, as JSON holds them."""
        n = self.call.noise
        out = {"rng": n.rng} if n.rng_given else {}
        if n.subseed_strength:
            out.update(subseed=n.subseed, subseed_strength=n.subseed_strength)
        if n.seed_resize_from is not None:
            out["seed_resize_from"] = list(n.seed_resize_from)
        if n.eta_noise_seed_delta:
            out["eta_noise_seed_delta"] = n.eta_noise_seed_delta
        return out

    def sdxl_json(self) -> dict:
        """The SDXL flags given, by flag name, as JSON holds them (pairs become lists, which
        is what a manifest read back compares with)."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in self.call.sdxl.flags().items()}


@dataclasses.dataclass(frozen=True)
class Sample:
    index: int
    row: int
    k: int
    prompt: str
    negative_prompt: str
    seed: int
    seed_index: int
    control_image: str | None = None  # the row's control image (relative to the table)


def plan_samples(rows: Iterable[Row], layout: Layout, shards: Iterable[int],
                 settings: Settings) -> Iterator[Sample]:
    """The samples of ``shards``, in index order, streaming ``rows``; reading stops after the
    last row those shards need."""
    todo = set(shards)
    if not todo:
        return
    last = layout.samples_in(max(todo)).stop - 1
    k_max = layout.images_per_prompt
    for r, row in enumerate(rows):
        if r * k_max > last:
            return
        for k in range(k_max):
            i = r * k_max + k
            if layout.shard_of(i) not in todo:
                continue
            own_seed = row.seed is not None
            yield Sample(i, r, k, row.prompt,
                         settings.negative_prompt if row.negative_prompt is None
                         else row.negative_prompt,
                         row.seed if own_seed else settings.seed, k if own_seed else i,
                         row.control_image)


def _batches(items: Iterator[Sample], size: int) -> Iterator[list[Sample]]:
    while batch := list(itertools.islice(items, size)):
        yield batch


def sample_files(sample: Sample, key: str, image: np.ndarray,
                 settings: Settings) -> dict[str, bytes]:
    """The files of one webdataset sample: image, caption, metadata."""
    call = settings.call
    meta = {"key": key, "index": sample.index, "row": sample.row, "k": sample.k,
            "prompt": sample.prompt, "negative_prompt": sample.negative_prompt,
            "seed": sample.seed, "seed_index": sample.seed_index, "steps": call.sampling.steps,
            "scheduler": call.sampling.scheduler,
            "guidance_scale": call.sampling.guidance_scale, "width": call.size.width,
            "height": call.size.height, "model": call.model, "dtype": settings.dtype,
            **settings.sdxl_json(), **settings.hires_json(), **settings.noise_json()}
    if settings.control:
        meta["control_image"] = sample.control_image
    parameters = call.parameters(sample.prompt, sample.negative_prompt, sample.seed,
                                 index=sample.seed_index, adapters=settings.texts)
    image_bytes = encode_image(image, settings.image_format, settings.quality, parameters)
    return {settings.image_format: image_bytes, "txt": sample.prompt.encode("utf-8"),
            "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}


def generate_shards(pipe, settings: Settings, layout: Layout, samples: Iterator[Sample],
                    store: Store, *, per_device: int, encode_threads: int,
                    shard_stats: dict | None = None,
                    on_written: Callable[[int], None] | None = None,
                    on_compiled: Callable[[], None] | None = None,
                    refiner=None, control=None,
                    say: Callable[[str], None] | None = None) -> list[dict]:
    """Generate and write the given samples (whole shards, in index order); returns the stats
    of the shards written. Batch k+1 is submitted before batch k's images are taken, so the
    devices never wait while the host encodes and writes. ``on_compiled`` is called once the
    first batch is dispatched (its compilation, if any, is over). ``refiner``: an SDXL
    refiner that finishes every image (``settings.call.sdxl`` has the switch point); the
    hand-off brings the base's latents to the host, so those batches run one at a time.
    ``control``: the samples' control images (``sdjax.dataset.control.ControlImages``).
    ``say``: where a prompt tag's LoRA line goes, once per LoRA (``lora_tags.TagLoras``)."""
    def encode(sample: Sample, image: np.ndarray) -> dict[str, bytes]:
        return sample_files(sample, layout.key(sample.index), image, settings)

    writer = AsyncShardWriter(store, layout, encode, threads=encode_threads,
                              shard_stats=shard_stats, on_written=on_written)
    batch_size = per_device * pipe.num_devices
    tag_loras = TagLoras(pipe, settings.lora_dir, say=say)  # as --lora says its own
    call_kwargs = settings.call.pipeline_kwargs()

    def submit(batch: list[Sample]) -> Callable[[], np.ndarray]:
        # One LoRA set per compiled call: a batch whose prompts' <lora:…> tags differ is one
        # call per set (image i still uses the noise of (seed, i)).
        split = [split_tags(s.prompt) for s in batch]
        handles = []
        for members in group_by_tags(tags for _, tags in split).values():
            tag_loras.use(split[members[0]][1])
            texts = [split[j][0] for j in members]
            call = dict(
                negative_prompt=[batch[j].negative_prompt for j in members],
                seeds=[batch[j].seed for j in members],
                image_indices=[batch[j].seed_index for j in members],
                batch_size_per_device=per_device, **call_kwargs)
            if control is not None:
                call.update(control.call_kwargs([control.for_row(batch[j].control_image,
                                                                 batch[j].row)
                                                 for j in members]))
            handles.append((members, pipe.submit(texts, **call) if refiner is None
                            else _Done(refine(pipe, refiner, texts, **call))))

        def images() -> np.ndarray:
            if len(handles) == 1:
                return handles[0][1].result().images
            out = [None] * len(batch)
            for members, handle in handles:
                for j, image in zip(members, handle.result().images, strict=True):
                    out[j] = image
            return np.stack(out)
        return images

    pending = None
    try:
        for batch in _batches(samples, batch_size):
            images = submit(batch)
            if pending is not None:
                writer.put(pending[0], pending[1]())
            elif on_compiled is not None:
                on_compiled()
            pending = (batch, images)
        if pending is not None:
            writer.put(pending[0], pending[1]())
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return writer.shards_written


class _Done:
    """A finished call's output where generate_shards expects PendingImages."""

    def __init__(self, output):
        self._output = output

    def result(self):
        return self._output


def _check_args(args) -> None:
    if args.prompts is None:
        raise UsageError("--prompts is required (except with --verify)")
    # No random seed: a dataset is resumed by re-running the same command.
    check_common_args(args, allow_random_seed=False)
    check_sdxl_args(args)
    for name in ("images_per_prompt", "samples_per_shard", "num_jobs"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not 0 <= args.job_index < args.num_jobs:
        raise UsageError(f"--job_index must be in [0, {args.num_jobs}), got {args.job_index}")
    if args.quality is not None:
        if args.format == "png":
            raise UsageError("--quality applies to --format jpg and webp (PNG is lossless)")
        if not 1 <= args.quality <= 100:
            raise UsageError(f"--quality must be in [1, 100], got {args.quality}")
    if args.format == "webp":
        from PIL import features
        if not features.check("webp"):
            raise UsageError("this Pillow build cannot write WebP; use --format png or jpg")
    if args.encode_threads is not None and args.encode_threads < 1:
        raise UsageError("--encode_threads must be at least 1")


def load_pipeline(model: str, dtype: str, num_devices: int | None, local_devices: bool,
                  options: ModelOptions | None = None):
    """The pipeline a run uses (a separate function so tests can share one across runs)."""
    from sdjax.dispatch import pipeline_class
    return pipeline_class(model).from_pretrained(model, dtype=dtype, num_devices=num_devices,
                                                 local_devices=local_devices,
                                                 **(options or ModelOptions()).kwargs())


def _job_split(num_jobs: int, job_index: int) -> tuple[int, int]:
    """(jobs, this job) counting every process of every job: process p of job j of N takes
    the shards s with s % (N * P) == j + N * p, which together are exactly job j's."""
    import jax

    from sdjax import parallel
    parallel.maybe_initialize_distributed()
    p, count = jax.process_index(), jax.process_count()
    return num_jobs * count, job_index + num_jobs * p


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def _cleaned_up_on_failure(store: Store) -> Iterator[None]:
    """Create the dataset folder; if the run then fails before any shard exists, remove what
    it wrote (the manifest, and the folder if this run made it): a failed first attempt
    leaves nothing that looks like a dataset."""
    existed = store.exists()
    store.create()
    try:
        yield
    except BaseException:
        if not any(shard_index(n) is not None for n in store.names()):
            store.remove(manifest.MANIFEST)
            if not existed:
                store.remove_empty_folder()
        raise


def run(args) -> int:
    from tqdm import tqdm

    t_start = time.perf_counter()
    started_at = _now()
    _check_args(args)
    control_images.check(args, UsageError)
    outdir = str(args.outdir)
    if not is_url(outdir):
        check_outdir(Path(outdir))
    store = Store(outdir)
    prompts = scan(str(args.prompts))
    layout = Layout(prompts.num_rows, args.images_per_prompt, args.samples_per_shard)
    if layout.num_samples >= MAX_SEED:
        raise UsageError(f"{layout.num_samples} samples is more than one run can index (2**32)")

    num_jobs, job = _job_split(args.num_jobs, args.job_index)
    import jax
    if args.model == "toy":
        print("Using the bundled toy model (shapes and colours only); pass --model for real "
              "Stable Diffusion weights.", file=sys.stderr)
    from sdjax.dispatch import pipeline_class
    cls = pipeline_class(args.model)
    if cls.UPSCALER:
        raise UsageError(f"--model {args.model} is an x4 upscaler, which upscales an image: "
                         "sdjax.generate makes images from prompts (upscale with "
                         "python -m sdjax.sample --model ... --image)")
    check_sdxl_models(args, cls.SDXL)  # before either model loads
    dtype = resolve_dtype(args.dtype)
    t_load = time.perf_counter()
    # Each process of a multi-host run makes its own shards on its own devices.
    options = ModelOptions.from_args(args)
    local = jax.process_count() > 1
    pipe = load_pipeline(args.model, dtype, args.num_devices, local, options)
    for path, _ in args.controlnet or []:
        pipe.load_controlnet(path)
    control = control_images.ControlImages(args, str(args.prompts)) if args.controlnet else None
    if pipe.note:
        print(pipe.note, file=sys.stderr)
    refiner = load_refiner(args, pipe, dtype, local_devices=local)
    adapters = tuple(apply_adapters(args, pipe))
    for line in adapters:
        print(line, file=sys.stderr)
    sampling = apply_sampling_defaults(args, pipe)
    load_s = time.perf_counter() - t_load
    scheduler = args.scheduler or pipe.default_scheduler
    if refiner is not None:
        check_schedule(pipe, refiner, scheduler, args.steps, args.refiner_switch_at)
    height, width = image_size(args, pipe)
    call = CallSettings.from_args(args, Size(height, width))
    settings = Settings(
        call, dtype=dtype, seed=args.seed, negative_prompt=args.negative_prompt,
        image_format=args.format,
        quality=None if args.format == "png" else (args.quality or 95), model_options=options,
        adapters=adapters, lora_dir=None if args.lora_dir is None else str(args.lora_dir),
        control=control_images.manifest_json(args),
        texts=Adapters.of(pipe, args.lora_dir))
    run_settings = settings.manifest(layout, prompts)
    manifest.check(store, run_settings, overwrite=args.overwrite)
    print(sampling, file=sys.stderr)

    # From here on the folder is ours to write.
    with _cleaned_up_on_failure(store):
        mine = range(job, layout.num_shards, num_jobs)
        for name in store.partial_names():  # left by a killed run of this job
            if (s := shard_file_index(name)) is not None and s % num_jobs == job:
                store.remove(f".{name}.partial")
        if args.overwrite:
            for name in store.names():
                if (s := shard_file_index(name)) is not None and s % num_jobs == job:
                    store.remove(name)
        manifest.write(store, run_settings, {"prompts_file": str(args.prompts)})
        done = {s for n in store.names() if (s := shard_index(n)) is not None}
        # Skip only the shards that read back as their stats describe (verify.py).
        for s, problem in bad_shards(store, layout, sorted(done & set(mine))).items():
            print(f"{layout.shard_name(s)} does not read back ({problem}): remaking it",
                  file=sys.stderr)
            store.remove(layout.shard_name(s))
            store.remove(layout.stats_name(s))
            done.discard(s)
        todo = [s for s in mine if s not in done]
        n_todo = sum(len(layout.samples_in(s)) for s in todo)

        per_device = args.batch_size or min(8, -(-layout.num_samples // pipe.num_devices))
        threads = args.encode_threads or min(16, os.cpu_count() or 1)
        platform = jax.devices()[0].platform
        job_text = f"job {job}/{num_jobs}: " if num_jobs > 1 else ""
        print(f"{job_text}{layout.num_samples} samples in {layout.num_shards} shard(s) of "
              f"{layout.samples_per_shard}; {len(mine) - len(todo)} of this job's {len(mine)} "
              f"already complete, {n_todo} samples to make")
        compile_before = with_refiner("compile_seconds", pipe, refiner)
        t_gen = time.perf_counter()
        written: list[dict] = []
        if todo:
            rows = read_rows(str(args.prompts))
            with tqdm(total=n_todo, unit="img", desc="generating", mininterval=1.0,
                      smoothing=0.05, dynamic_ncols=True) as bar:
                written = generate_shards(
                    pipe, settings, layout, plan_samples(rows, layout, todo, settings), store,
                    per_device=per_device, encode_threads=threads, on_written=bar.update,
                    refiner=refiner, control=control,
                    say=lambda line: tqdm.write(line, file=sys.stderr),  # a tag's "LoRA ..."
                    on_compiled=bar.reset,  # restart the clock: compile time is not throughput
                    shard_stats={"job_index": job, "num_jobs": num_jobs,
                                 "host": socket.gethostname(), "devices": pipe.num_devices,
                                 "platform": platform, "batch_size_per_device": per_device})
        compile_s = with_refiner("compile_seconds", pipe, refiner) - compile_before
        gen_s = max(time.perf_counter() - t_gen - compile_s, 1e-9)
        made = sum(s["count"] for s in written)

        this_run = {"job_index": job, "num_jobs": num_jobs, "samples_generated": made,
                    "shards_written": len(written), "shards_skipped": len(mine) - len(todo),
                    "load_seconds": round(load_s, 3), "compile_seconds": round(compile_s, 3),
                    "generation_seconds": round(gen_s, 3),
                    "images_per_second": round(made / gen_s, 3) if made else None,
                    "seconds": round(time.perf_counter() - t_start, 3), "started_at": started_at,
                    "finished_at": _now(), "host": socket.gethostname(),
                    "devices": pipe.num_devices, "platform": platform,
                    "batch_size_per_device": per_device}
        read_back = (done & set(mine)) | {shard_index(w["shard"]) for w in written}
        _write_run_stats(store, layout, this_run, num_jobs, job, read_back)
        store.close()

    print(f"wrote {len(written)} shard(s), {made} samples to {outdir}")
    print(f"devices: {pipe.num_devices} x {platform}, batch {per_device * pipe.num_devices} "
          f"({per_device}/device), {dtype}, {scheduler}, {args.steps} steps, {width}x{height}")
    rate = f"{made / gen_s:.2f} images/s" if made else "nothing to generate"
    print(f"compile: {compile_s:.1f}s  generation: {gen_s:.2f}s  {rate}")
    return 0


def _wait_for_other_processes() -> bool:
    """On a multi-process run, wait until every process has written its shards and job file;
    True on the processes that leave the summary to the first one (which then sees them all)."""
    import jax
    if jax.process_count() == 1:
        return False
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("sdjax.generate: every process's shards written")
    return jax.process_index() != 0


def _write_run_stats(store: Store, layout: Layout, this_run: dict, num_jobs: int,
                     job: int, read_back: set[int] = frozenset()) -> None:
    """``stats.json``: the dataset's completeness plus each job's latest run. Split runs also
    keep one file per job, from which every job refreshes ``stats.json`` as it finishes."""
    jobs = [this_run]
    if num_jobs > 1:
        width = len(str(num_jobs - 1))
        store.write_text(f"stats_job{job:0{width}d}-of-{num_jobs}.json",
                         json.dumps(this_run, indent=1) + "\n")
        if _wait_for_other_processes():
            return
        names = sorted(n for n in store.names()
                       if n.startswith("stats_job") and n.endswith(f"-of-{num_jobs}.json"))
        jobs = [json.loads(store.read_text(n) or "null") for n in names]
        jobs = [j for j in jobs if j]
    present = {s for n in store.names() if (s := shard_index(n)) is not None
               and s < layout.num_shards}
    # Never claim a sample that cannot be read: every shard this run has not just checked or
    # written is read back (verify.py).
    complete = present - set(bad_shards(store, layout, sorted(present - read_back)))
    stats = {"complete": len(complete) == layout.num_shards,
             "samples": layout.num_samples, "shards": layout.num_shards,
             "samples_complete": sum(len(layout.samples_in(s)) for s in complete),
             "shards_complete": len(complete), "jobs": jobs}
    store.write_text("stats.json", json.dumps(stats, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verify:
        return run_main(lambda: verify_dataset(str(args.outdir)))
    return run_main(lambda: run(args), lambda: (
        "interrupted: complete shards are kept and partial ones removed; run the same command "
        "again to resume"))


if __name__ == "__main__":
    sys.exit(main())
