"""The bundled toy model follows its prompts: 24 prompts covering every colour (as shape and
as background) and every shape, each image classified by plain pixel statistics (border
colour = background, most frequent other colour = shape colour, fill ratio of the shape's
bounding box = shape)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sdjax.pipeline import StableDiffusionPipeline
from sdjax.train import shapes
from sdjax.train.toy import EVAL_PROMPTS
from sdjax.weights.resolve import toy_controlnet_path, toy_path
from tests.conftest import optimized_compiles

PROMPTS = shapes.prompt_grid(EVAL_PROMPTS)
SEEDS = range(4)  # issue 13's target is averaged over seeds 0-3
STEPS = 20  # for the img2img test below


@pytest.fixture(scope="module")
def pipe():
    return StableDiffusionPipeline.from_pretrained("toy", dtype="float32")


@pytest.fixture(scope="module")
def images(pipe):
    """The evaluation prompts with seeds 0-3 (96 images) at the toy's own defaults (its
    sdjax.json: the step count, scheduler and guidance interval users get with no flags), at
    guidance 7.5 and at guidance 1, in one call of 192 images: guidance is per image, and at
    1 an image's prediction is its conditional one (uncond + 1 * (cond - uncond)), so one
    compiled program makes both sets."""
    seeds = [s for s in SEEDS for _ in PROMPTS]
    indices = list(range(len(PROMPTS))) * len(SEEDS)
    n = len(seeds)
    with optimized_compiles():  # 192 images: the run, not the compile, is the cost
        out = pipe(PROMPTS * len(SEEDS) * 2, guidance_scale=[7.5] * n + [1.0] * n,
                   seeds=seeds * 2, image_indices=indices * 2).images
    return {7.5: out[:n], 1.0: out[n:]}


def accuracy(images) -> dict[str, float]:
    return shapes.accuracy(images, PROMPTS * len(SEEDS))


def test_prompts_cover_every_colour_and_shape():
    parsed = [shapes.parse_caption(p) for p in PROMPTS]
    assert {c for c, _, _ in parsed} == {b for _, _, b in parsed} == set(shapes.COLOURS)
    assert {s for _, s, _ in parsed} == set(shapes.SHAPES)


def test_follows_colour_prompts(images):
    acc = accuracy(images[7.5])
    # "colour" counts an image right only when both the shape's and the background's are.
    assert acc["colour"] >= 0.9, acc


def test_follows_shape_prompts(images):
    """Issue 13's amended target (shape >= 0.75 at guidance 7.5), reached through the toy's
    guidance interval: without it, guidance pushes squares' corners out into stars."""
    acc = accuracy(images[7.5])
    assert acc["shape"] >= 0.75, acc


def test_guidance_is_not_worse_than_none(images):
    strong, weak = accuracy(images[7.5]), accuracy(images[1.0])
    print(f"guidance 7.5: {strong}, guidance 1: {weak}")
    assert strong["colour"] >= weak["colour"] and strong["shape"] >= weak["shape"], (strong,
                                                                                     weak)


def test_toy_defaults(pipe):
    settings = pipe.sampling_settings()
    assert settings["guidance_scale"] == 7.5  # the target is at the library's guidance
    assert settings["guidance_interval"] is not None


def test_default_size_and_footprint(pipe, images):
    assert pipe.default_hw == (32, 32)
    assert images[7.5].shape == (len(PROMPTS) * len(SEEDS), 32, 32, 3)
    assert images[7.5].dtype == np.uint8
    folder = toy_path()
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size < 20 * 2**20, size
    summary = json.loads((folder / "training" / "summary.json").read_text())
    assert summary["train_s_total"] < 3600


def test_img2img_turns_a_red_circle_green(pipe):
    """img2img with the toy: a red circle on blue, prompted green at strength 0.5, comes back a
    green circle on the same blue; prompted red, it stays red (same compiled call)."""
    red = shapes.render("red", "circle", "blue", size=32, cx=16, cy=16, side=16)
    inside = shapes.shape_mask("circle", 32, 16, 16, 16) > 0.5
    results = {}
    for colour in ("green", "red"):
        out = pipe([f"a {colour} circle on a blue background"] * 8, image=red, strength=0.5,
                   num_inference_steps=STEPS, seed=0).images
        results[colour] = out[:, inside].astype(np.float32).mean(axis=1)  # (8, RGB) in circle
        classes = [shapes.classify(x) for x in out]
        assert all(c[0] == colour and c[2] == "blue" for c in classes), classes
        assert sum(c[1] == "circle" for c in classes) >= 5, classes
    green, kept = results["green"].mean(0), results["red"].mean(0)
    print(f"mean RGB inside the circle: prompted green {green.round()}, red {kept.round()}")
    assert green[1] > 150 and green[0] < 80, green
    assert kept[0] > 150 and kept[1] < 80, kept


def test_toy_controlnet_puts_the_shape_where_the_edge_map_says():
    """The bundled ControlNet, by its name and offline: on the first two evaluation shapes
    (python -m sdjax.train.toy_controlnet measures 32), the shape the toy draws overlaps the
    region the edge map encloses far more than the same seeds draw without it."""
    from sdjax.train import toy_controlnet

    result = toy_controlnet.evaluate("toy-edges", n=2)
    print(f"toy-edges on 2 shapes: {result}")
    assert result["with"]["placed"] == 1.0, result
    assert result["with"]["mean_iou"] > result["without"]["mean_iou"] + 0.25, result
    folder = toy_controlnet_path("toy-edges")
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size < 8 * 2**20, size
