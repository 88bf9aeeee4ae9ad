"""The trainer on tiny recipes: loss goes down, resuming is bitwise identical to not
stopping, every task trains and exports, and the export loads in diffusers with the same
images as sdjax."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import tarfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from sdjax.models.clip_text import CLIPTextConfig, CLIPTextModel
from sdjax.models.vae import AutoencoderKL, VAEConfig
from sdjax.train import shapes
from sdjax.train.checkpoint import Checkpoints
from sdjax.train.config import (
    AutoencoderConfig,
    ContrastiveConfig,
    ControlNetTrainConfig,
    DataConfig,
    DiffusionConfig,
    LoraConfig,
    OptimConfig,
    TextualInversionConfig,
    TokenizerConfig,
    TrainConfig,
    load_config,
    override,
)
from sdjax.train.data import make_source
from sdjax.train.loop import TrainResult, train
from sdjax.train.tokenizer import bpe, build_merges, write_clip_tokenizer
from sdjax.weights import export

RES = 16  # pixels; the tiny VAE has factor 2, so latents are 8x8
DDIM = {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "clip_sample": False,
        "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon"}
TINY_UNET = {"sample_size": 8, "block_out_channels": [16, 32], "layers_per_block": 1,
             "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 32,
             "attention_head_dim": 2, "norm_num_groups": 8}
TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
             "num_attention_heads": 2}
TINY_VAE = {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
            "sample_size": RES, "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2}


@pytest.fixture(scope="module")
def frozen_parts(tmp_path_factory):
    """A folder with a random text encoder, VAE and tokenizer, written by sdjax's export:
    what a UNet run starts from."""
    folder = tmp_path_factory.mktemp("parts")
    n = write_clip_tokenizer(folder / "tokenizer", shapes.VOCABULARY, model_max_length=12)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=n, max_position_embeddings=12, **TINY_TEXT),
                       rngs=nnx.Rngs(0))
    vae = AutoencoderKL(VAEConfig.from_dict(TINY_VAE), rngs=nnx.Rngs(1))
    export.save_network(folder / "text_encoder", te,
                        {"bos_token_id": n - 2, "eos_token_id": n - 1, "pad_token_id": n - 1})
    export.save_network(folder / "vae", vae)
    return folder


def unet_recipe(out, parts, **kw) -> TrainConfig:
    cfg = TrainConfig(
        task="unet", output_dir=str(out), pretrained=str(parts), unet=TINY_UNET,
        diffusion=DiffusionConfig(scheduler=DDIM, caption_dropout=0.1, min_snr_gamma=5.0),
        data=DataConfig(source="shapes", resolution=RES, prefetch=1),
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=4, schedule="cosine",
                          accumulate_steps=2),
        batch_size=8, steps=30, seed=0, ema_decay=0.9, num_devices=2, checkpoint_every=15,
        log_every=1, progress=False)
    return override(cfg, kw)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, frozen_parts):
    return train(unet_recipe(tmp_path_factory.mktemp("a"), frozen_parts))


def test_loss_goes_down(uninterrupted):
    losses = [r["loss"] for r in uninterrupted.history]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses


def interrupted_copy(run: TrainResult, at: int, folder: Path) -> Path:
    """``run``'s output folder as an interruption soon after its step-``at`` checkpoint
    leaves it: a copy without the later checkpoints and the export, whose log goes on past
    ``at``. Resuming it runs only the steps after ``at`` (a run stopped there, then resumed,
    would run every step twice); ``stop_at`` itself is checked in
    test_float32_training_asks_for_full_precision."""
    export = run.export_dir
    shutil.copytree(export.parent, folder, ignore=lambda d, _: [export.name]
                    if Path(d) == export.parent else [])
    ckpt = Checkpoints(folder / "checkpoints", keep=2)
    for step in ckpt.manager.all_steps():
        if step > at:
            ckpt.manager.delete(step)
    assert ckpt.latest() == at
    ckpt.close()
    return folder


def test_resume_is_bitwise_identical(tmp_path, frozen_parts, uninterrupted):
    folder = interrupted_copy(uninterrupted, 15, tmp_path / "run")
    # picks up the step-15 checkpoint (weights, EMA, Adam, data position)
    resumed = train(unet_recipe(folder, frozen_parts))
    assert resumed.step == 30
    for got, want in ((resumed.params, uninterrupted.params), (resumed.ema, uninterrupted.ema)):
        jax.tree.map(np.testing.assert_array_equal, got, want)
    # The log of the resumed output folder is one curve, equal to the uninterrupted one:
    # the records the interrupted run wrote after its checkpoint are dropped.
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in uninterrupted.history]
    # It did resume: the first 15 records are the copied ones, timings and all (a run that
    # ignored the checkpoint would also end equal, with records of its own).
    assert resumed.history[:15] == uninterrupted.history[:15]


def test_float32_training_asks_for_full_precision(tmp_path, frozen_parts, uninterrupted,
                                                  monkeypatch):
    """float32 means float32 in training as in sampling: the step's dots and convolutions
    carry HIGHEST in the HLO every backend compiles (XLA's default on GPUs/TPUs is TF32 /
    bfloat16 passes); ``matmul_precision: default`` leaves XLA its default. The run reuses
    ``uninterrupted``'s compiled step (the same recipe, stopped after one step)."""
    from sdjax.train import loop
    from tests.test_precision import precisions_in

    lowered = {}
    real = loop.compiled_step

    def spy(spec, mesh):
        def call(*args):
            if not lowered:
                for precision in (spec.precision, "default"):
                    fn = real(dataclasses.replace(spec, precision=precision), mesh)
                    lowered[precision] = precisions_in(fn.lower(*args).as_text())
            return real(spec, mesh)(*args)
        return call

    monkeypatch.setattr(loop, "compiled_step", spy)
    stopped = train(unet_recipe(tmp_path, frozen_parts), stop_at=1)
    assert stopped.step == 1 and stopped.export_dir is None  # stopped early: no export
    ckpt = Checkpoints(tmp_path / "checkpoints", keep=2)
    assert ckpt.latest() == 1  # but a checkpoint to resume from
    ckpt.close()
    assert set(lowered) == {"highest", "default"}
    assert set(lowered["highest"]) == {"dot_general", "convolution"}, lowered
    assert all(names == {"HIGHEST"} for names in lowered["highest"].values()), lowered
    assert not any({"HIGHEST", "HIGH"} & names for names in lowered["default"].values())


def test_export_loads_in_diffusers_with_the_same_images(uninterrupted):
    import torch
    from diffusers import StableDiffusionPipeline as TorchPipeline

    from sdjax.pipeline import StableDiffusionPipeline

    folder = uninterrupted.export_dir
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())[
        "_class_name"] == "DDIMScheduler"
    ref = TorchPipeline.from_pretrained(str(folder), safety_checker=None,
                                        requires_safety_checker=False)
    ours = StableDiffusionPipeline.from_pretrained(str(folder), dtype="float32", num_devices=1)
    prompts = ["a red circle on a blue background", "a white square on a black background"]
    latents = np.random.RandomState(0).randn(2, 8, 8, 4).astype(np.float32)
    with torch.no_grad():
        want = ref(prompts, latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()),
                   num_inference_steps=4, guidance_scale=5.0, output_type="np").images
    got = ours(prompts, latents=latents, num_inference_steps=4, guidance_scale=5.0,
               output_type="float").images
    assert got.shape == want.shape == (2, RES, RES, 3)
    assert np.abs(got - want).max() < 2e-4  # float32 both sides; measured ~3e-6


def test_vae_and_clip_tasks_train_and_export(tmp_path):
    """Both other tasks, each also exercising an option: the VAE in bfloat16 compute with
    float32 master weights, CLIP with rematerialisation."""
    data = DataConfig(source="shapes", resolution=RES, prefetch=0)
    optim = OptimConfig(learning_rate=3e-3, warmup_steps=2)
    vae = train(TrainConfig(
        task="vae", output_dir=str(tmp_path / "vae"), vae=TINY_VAE, data=data, optim=optim,
        autoencoder=AutoencoderConfig(kl_weight=1e-4, scaling_batches=2),
        compute_dtype="bfloat16", batch_size=8, steps=20, log_every=1, progress=False,
        num_devices=1, export_dir=str(tmp_path / "model")))
    clip = train(TrainConfig(
        task="clip", output_dir=str(tmp_path / "clip"),
        tokenizer=TokenizerConfig(words=shapes.VOCABULARY, model_max_length=12),
        text_encoder=TINY_TEXT, contrastive=ContrastiveConfig(image_channels=(8, 16)),
        data=data, optim=optim, remat_policy="dots_saveable", batch_size=16, steps=20,
        log_every=1, progress=False, num_devices=1, export_dir=str(tmp_path / "model")))
    for result in (vae, clip):
        losses = [r["loss"] for r in result.history]
        assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4]), losses
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(vae.params))

    from sdjax.weights.diffusers_folder import load_network, load_tokenizer, read_config

    folder = tmp_path / "model"
    vae_cfg = read_config(folder, "vae")
    assert vae_cfg.scaling_factor != VAEConfig().scaling_factor  # measured from the latents
    load_network(folder, "vae")
    te = load_network(folder, "text_encoder")
    ids = load_tokenizer(folder)(["a red circle"], padding="max_length",
                                 max_length=12, return_tensors="np").input_ids
    assert te(jnp.asarray(ids)).shape == (1, 12, 32)


def test_tokenizer_makes_each_word_one_token(tmp_path):
    from transformers import CLIPTokenizer

    words = ["red", "green", "greener", "reed", "background", "a"]
    ranks = {m: i for i, m in enumerate(build_merges(words))}
    assert all(len(bpe(w, ranks)) == 1 for w in words)
    write_clip_tokenizer(tmp_path, words, model_max_length=10)
    tok = CLIPTokenizer.from_pretrained(str(tmp_path))
    ids = tok("a greener reed, red!").input_ids
    assert tok.convert_ids_to_tokens(ids)[1:5] == ["a</w>", "greener</w>", "reed</w>", ",</w>"]


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_folder_and_webdataset_sources(tmp_path):
    images = [np.full((20, 24, 3), 10 * i, np.uint8) for i in range(5)]
    (tmp_path / "folder").mkdir()
    with tarfile.open(tmp_path / "shard-0.tar", "w") as tar:
        for i, img in enumerate(images):
            (tmp_path / "folder" / f"{i}.png").write_bytes(_png(img))
            (tmp_path / "folder" / f"{i}.txt").write_text(f"caption {i}\n")
            for name, data in ((f"s{i}.png", _png(img)), (f"s{i}.txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    for source, path in (("folder", tmp_path / "folder"), ("webdataset", tmp_path)):
        src = make_source(DataConfig(source=source, path=str(path), resolution=16), seed=3)
        assert len(src) == 5
        epoch = [src.get(i) for i in range(5)]
        # Each epoch is a permutation; images are resized+cropped and match their caption.
        assert sorted(c for _, c in epoch) == [f"caption {i}" for i in range(5)]
        for img, cap in epoch:
            assert img.shape == (16, 16, 3) and img[0, 0, 0] == 10 * int(cap.split()[1])
        again = make_source(DataConfig(source=source, path=str(path), resolution=16), seed=3)
        assert [again.get(i)[1] for i in (7, 2, 9)] == [src.get(i)[1] for i in (7, 2, 9)]


def test_recipes_load_and_override(tmp_path):
    configs = Path(__file__).resolve().parents[1] / "configs"
    for stage in ("clip", "vae", "unet"):
        cfg = load_config(configs / f"toy_{stage}.py")
        assert cfg.task == stage
    for recipe, task in (("ti", "textual_inversion"), ("lora", "lora"),
                         ("controlnet", "controlnet")):
        adapter = load_config(configs / f"toy_{recipe}.py")
        assert adapter.task == task and adapter.pretrained == "toy"
    cfg = override(cfg, {"optim.learning_rate": 5e-4, "steps": 7})
    assert cfg.optim.learning_rate == 5e-4 and cfg.steps == 7
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"task": "vae", "data": {"resolution": 64},
                                "contrastive": {"image_channels": [4, 8]}}))
    cfg = load_config(path)
    assert cfg.data.resolution == 64 and cfg.contrastive.image_channels == (4, 8)
    path.write_text(json.dumps({"task": "vae", "optim": {"learning_rat": 1}}))
    with pytest.raises(ValueError, match="learning_rat"):
        load_config(path)


def test_shapes_classifier_reads_the_training_images():
    for i in range(200):
        img, cap = shapes.sample(7, i, 32)
        assert shapes.classify(img) == shapes.parse_caption(cap), cap


# ----------------------------------------------------------- textual inversion and LoRA
# Both start from the exported folder of `uninterrupted` (a tiny model trained above) and
# learn a new colour word from a folder of magenta shapes.
NEW_WORD = "<new>"
ADAPTER_PROMPT = f"a {NEW_WORD} circle on a blue background"


@pytest.fixture(scope="module")
def concept(tmp_path_factory):
    from sdjax.train.concept import write_concept

    folder = tmp_path_factory.mktemp("concept") / "data"
    write_concept(folder, word=NEW_WORD, count=12, size=RES)
    return folder


def adapter_recipe(task, out, uninterrupted, concept, **kw) -> TrainConfig:
    cfg = TrainConfig(
        task=task, output_dir=str(out), pretrained=str(uninterrupted.export_dir),
        textual_inversion=TextualInversionConfig(token=NEW_WORD, init_word="red", num_vectors=2),
        lora=LoraConfig(rank=2, alpha=4.0, unet_targets=("to_k", "to_v", "proj_in"),
                        text_encoder_targets=("q_proj", "fc1")),
        data=DataConfig(source="folder", path=str(concept), resolution=RES, prefetch=1),
        optim=OptimConfig(learning_rate=2e-2, weight_decay=0.0), batch_size=8, steps=12,
        num_devices=1, checkpoint_every=6, log_every=1, progress=False)
    return override(cfg, kw)


@pytest.fixture(scope="module")
def adapter_runs(tmp_path_factory, uninterrupted, concept):
    """task -> (uninterrupted result, result of resuming its folder from step 6)."""
    out = {}
    for task in ("textual_inversion", "lora"):
        whole = train(adapter_recipe(task, tmp_path_factory.mktemp(task), uninterrupted,
                                     concept))
        folder = interrupted_copy(whole, 6, tmp_path_factory.mktemp(task + "-resumed") / "run")
        out[task] = whole, train(adapter_recipe(task, folder, uninterrupted, concept))
    return out


def fixed_losses(cfg: TrainConfig, trained) -> tuple[float, float]:
    """The task's loss on the first 8 samples, averaged over 8 fixed noise draws, for the
    initial and the ``trained`` parameters. A trained adapter changes a tiny model's loss by
    a few percent, less than the logged loss varies from step to step with its random
    timesteps; on fixed draws the change shows."""
    from sdjax.train.loop import SETUPS

    setup = SETUPS[cfg.task](cfg, jnp.asarray)
    source = make_source(cfg.data, cfg.seed)
    images, captions = zip(*(source.get(i) for i in range(8)), strict=True)
    batch = setup.prepare(np.stack(images), list(captions), np.arange(8))
    loss = jax.jit(lambda p, k: setup.task.loss(p, setup.frozen, batch, k)[0])
    return tuple(float(np.mean([loss(p, jax.random.key(i)) for i in range(8)]))
                 for p in (setup.params, trained))


@pytest.mark.parametrize("task", ["textual_inversion", "lora"])
def test_adapter_tasks_learn_resume_exactly_and_train_only_their_part(
        task, adapter_runs, uninterrupted, concept, tmp_path):
    whole, resumed = adapter_runs[task]
    cfg = adapter_recipe(task, tmp_path, uninterrupted, concept)
    before, after = fixed_losses(cfg, whole.params)
    print(f"{task}: fixed-draw loss {before:.4f} -> {after:.4f}")
    assert after < 0.995 * before
    jax.tree.map(np.testing.assert_array_equal, resumed.params, whole.params)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in whole.history]
    assert resumed.history[:6] == whole.history[:6]  # resumed from step 6, not rerun
    if task == "textual_inversion":  # the new rows are the only trained parameter
        assert list(whole.params) == ["vectors"] and whole.params["vectors"].shape == (2, 32)
    else:  # to_k, to_v of attn1 and attn2, and proj_in, in 4 transformers; q_proj and fc1
        layers = whole.params["layers"]
        assert len(layers) == 4 * 5 + 2 and all(f["down"].shape[1] == 2 for f in layers)
    assert sorted(p.name for p in whole.export_dir.iterdir()) == (
        ["learned_embeds.safetensors", "new.safetensors"] if task == "textual_inversion"
        else ["lora.safetensors", "pytorch_lora_weights.safetensors"])


def _flat(pipe) -> dict:
    return {(net, p): np.asarray(v.get_value()) for net, state in pipe.params.items()
            for p, v in nnx.to_flat_state(state)}


def test_exported_adapters_load_in_diffusers_with_the_same_images(adapter_runs, uninterrupted):
    """Both tasks' diffusers files, loaded by diffusers and by sdjax: the same images. The
    WebUI/kohya files read back to the same numbers in sdjax, and the weights the adapters do
    not touch stay bitwise as they were."""
    import torch
    from diffusers import StableDiffusionPipeline as TorchPipeline

    from sdjax.pipeline import StableDiffusionPipeline
    from sdjax.weights import lora
    from sdjax.weights.embeddings import read_embedding

    folder = uninterrupted.export_dir
    ti, lo = (adapter_runs[t][0] for t in ("textual_inversion", "lora"))
    ref = TorchPipeline.from_pretrained(str(folder), safety_checker=None,
                                        requires_safety_checker=False)
    ours = StableDiffusionPipeline.from_pretrained(str(folder), dtype="float32", num_devices=1)
    latents = np.random.RandomState(1).randn(1, 8, 8, 4).astype(np.float32)

    def reference() -> np.ndarray:
        with torch.no_grad():
            return ref(ADAPTER_PROMPT, num_inference_steps=3, guidance_scale=5.0,
                       latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()),
                       output_type="np").images

    base = reference()
    before = _flat(ours)

    ref.load_textual_inversion(str(ti.export_dir / "learned_embeds.safetensors"))
    assert ours.load_textual_inversion(ti.export_dir / "learned_embeds.safetensors") == NEW_WORD
    # the WebUI's file, named new.safetensors, holds the same vectors
    _, vectors = read_embedding(ti.export_dir / "new.safetensors", NEW_WORD)
    np.testing.assert_array_equal(vectors, ti.params["vectors"])
    table_path = ("text_encoder", ("embeddings", "token_embedding", "embedding"))
    grown = _flat(ours)[table_path]
    rows = before[table_path].shape[0]
    np.testing.assert_array_equal(grown[:rows], before[table_path])
    np.testing.assert_array_equal(grown[rows:], ti.params["vectors"])
    ti_only = reference()

    peft_file = lo.export_dir / "pytorch_lora_weights.safetensors"
    ref.load_lora_weights(str(peft_file))
    assert ours.load_lora(peft_file) == "pytorch_lora_weights"
    nets = {net: ours.network(net) for net in lora.SD_PREFIXES}
    peft, kohya = (lora.read_lora(lo.export_dir / f, nets)
                   for f in ("pytorch_lora_weights.safetensors", "lora.safetensors"))
    deltas = {(la.network, la.path): la.delta() for la in peft.layers}
    assert {(la.network, la.path) for la in kohya.layers} == deltas.keys()
    for la in kohya.layers:
        np.testing.assert_allclose(la.delta(), deltas[la.network, la.path], rtol=1e-6)
    changed = {(net, tuple(int(x) if x.isdigit() else x for x in path.split(".")))
               for net, path in deltas} | {table_path}
    after = _flat(ours)
    assert {k for k in before if not np.array_equal(before[k], after[k])} == changed

    want = reference()
    got = ours(ADAPTER_PROMPT, num_inference_steps=3, guidance_scale=5.0, latents=latents,
               output_type="float").images
    err = np.abs(got - want).max()
    print(f"embedding + LoRA: max abs pixel error against diffusers {err:.2e}")
    assert err < 2e-4
    # each trained adapter does change the image
    assert min(np.abs(ti_only - base).max(), np.abs(want - ti_only).max()) > 1e-2


@pytest.fixture(scope="module")
def control_data(tmp_path_factory):
    """8 shapes with their edge maps beside them (x.png, x.control.png, x.txt)."""
    folder = tmp_path_factory.mktemp("control-data")
    for i in range(8):
        image, caption = shapes.sample(5, i, RES, control="edges", jitter=0.25)
        Image.fromarray(image[..., :3]).save(folder / f"{i}.png")
        Image.fromarray(image[..., 3:]).save(folder / f"{i}.control.png")
        (folder / f"{i}.txt").write_text(caption)
    return folder


def controlnet_recipe(out, uninterrupted, data, **kw) -> TrainConfig:
    cfg = TrainConfig(
        task="controlnet", output_dir=str(out), pretrained=str(uninterrupted.export_dir),
        controlnet=ControlNetTrainConfig(conditioning_embedding_out_channels=(8, 16),
                                         name="edges"),
        data=DataConfig(source="folder", path=str(data), resolution=RES, control="control",
                        prefetch=1),
        diffusion=DiffusionConfig(caption_dropout=0.2),
        optim=OptimConfig(learning_rate=1e-2, weight_decay=0.0), batch_size=4, steps=4,
        ema_decay=0.5, num_devices=2, checkpoint_every=2, log_every=1, progress=False)
    return override(cfg, kw)


@pytest.fixture(scope="module")
def controlnet_runs(tmp_path_factory, uninterrupted, control_data):
    """(uninterrupted run, the same resumed from its step-2 checkpoint)."""
    whole = train(controlnet_recipe(tmp_path_factory.mktemp("cn"), uninterrupted,
                                    control_data))
    folder = interrupted_copy(whole, 2, tmp_path_factory.mktemp("cn-resumed") / "run")
    return whole, train(controlnet_recipe(folder, uninterrupted, control_data))


def test_controlnet_task_starts_from_the_unet_resumes_exactly_and_exports(
        controlnet_runs, uninterrupted, control_data, tmp_path):
    """A ControlNet made from the UNet's encoder (its weights copied, the zero convolutions
    and the conditioning embedding's last conv zero), trained on 2 devices with EMA; resuming
    is bitwise the uninterrupted run; the export (a diffusers folder with the original
    single file inside) loads into the pipeline, both forms to the same weights, and
    steers its images."""
    from sdjax.pipeline import StableDiffusionPipeline
    from sdjax.train.controlnet import COPIED, ZEROED
    from sdjax.train.loop import SETUPS
    from sdjax.weights.controlnet_files import load_controlnet

    whole, resumed = controlnet_runs
    jax.tree.map(np.testing.assert_array_equal, resumed.params, whole.params)
    jax.tree.map(np.testing.assert_array_equal, resumed.ema, whole.ema)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in whole.history]
    assert resumed.history[:2] == whole.history[:2]

    setup = SETUPS["controlnet"](controlnet_recipe(tmp_path, uninterrupted, control_data),
                                 jnp.asarray)
    start, unet = setup.params["controlnet"], setup.frozen["unet"]
    assert list(setup.params) == ["controlnet"] and set(setup.frozen) == {
        "unet", "vae", "text_encoder"}
    for name in COPIED:
        if name in unet:
            jax.tree.map(np.testing.assert_array_equal, start[name], unet[name])
    trained = whole.params["controlnet"]
    for path in ZEROED:
        assert all(not np.any(x) for x in jax.tree.leaves(_at(start, path))), path
        assert any(np.any(x) for x in jax.tree.leaves(_at(trained, path))), path

    folder = whole.export_dir
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors", "edges.safetensors"]
    pipe = StableDiffusionPipeline.from_pretrained(str(uninterrupted.export_dir),
                                                   dtype="float32", num_devices=1,
                                                   controlnet=str(folder))
    base = pipe.unet_config
    loaded = [nnx.to_pure_dict(nnx.state(load_controlnet(src, base)))
              for src in (folder, folder / "edges.safetensors")]
    jax.tree.map(np.testing.assert_array_equal, loaded[0], loaded[1])
    jax.tree.map(np.testing.assert_array_equal, loaded[0], whole.ema["controlnet"])
    control = np.asarray(Image.open(control_data / "0.control.png"))
    images = {scale: pipe("a red circle on a blue background", control_image=control,
                          controlnet_conditioning_scale=scale, num_inference_steps=2, seed=0,
                          output_type="float").images for scale in (0.0, 1.0)}
    assert np.abs(images[1.0] - images[0.0]).max() > 1e-3


def _at(tree, path):
    for part in path:
        tree = tree[part]
    return tree


@pytest.mark.parametrize("case, message", [
    ("no_control", "needs data.control"),
    ("control_on_unet", "data.control is for task 'controlnet'"),
    ("missing_map", "no control map beside it"),
    ("wrong_size", "they must be the same size"),
    ("unknown_shapes_map", "data.control must be edges or mask"),
    ("embedding_factor", "downsamples the control image 4x, the model's VAE 2x"),
])
def test_controlnet_bad_input_is_one_line_and_exit_2(case, message, tmp_path, uninterrupted,
                                                     control_data, capsys):
    from sdjax.train.__main__ import main

    data = tmp_path / "data"
    shutil.copytree(control_data, data)
    cfg = json.loads(json.dumps(dataclasses.asdict(controlnet_recipe(
        tmp_path / "out", uninterrupted, data))))
    if case == "no_control":
        cfg["data"]["control"] = None
    elif case == "control_on_unet":
        cfg.update(task="unet", controlnet=dataclasses.asdict(ControlNetTrainConfig()))
    elif case == "missing_map":
        (data / "3.control.png").unlink()
    elif case == "wrong_size":
        Image.new("RGB", (RES + 2, RES)).save(data / "3.control.png")
    elif case == "unknown_shapes_map":
        cfg["data"].update(source="shapes", path=None, control="depth")
    else:
        cfg["controlnet"]["conditioning_embedding_out_channels"] = [8, 16, 32]
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(cfg))
    assert main(["--config", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out").exists()
