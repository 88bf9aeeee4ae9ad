"""Prompt editing ``[a:b:when]``, alternation ``[a|b]`` and composable ``AND``: the schedules are
the WebUI's (its ``get_learned_conditioning_prompt_schedules`` and ``get_multicond_prompt_list``,
restated as expected values: its docstring's cases and more, each checked against the WebUI's
own lark parser under several hash seeds, none of them one it reads two ways), and their
identities on the tiny models in float32, in one program per bucket."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sdjax
from sdjax import prompt_editing, sampling
from sdjax.pipeline import StableDiffusionPipeline
from sdjax.prompts import prompt_schedules, split_and


def _alternating(*texts: str, steps: int = 10) -> list[list]:
    return [[s, texts[(s - 1) % len(texts)]] for s in range(1, steps + 1)]


_PHOTO = "(photo:1.2) of a {} BREAK {}"
SCHEDULES = [  # (prompt, its schedule over 10 steps)
    # The WebUI's docstring (its "{b|d{" case as its parser reads it: not at all).
    ("test", [[10, "test"]]),
    ("a [b:3]", [[3, "a "], [10, "a b"]]),
    ("a [b: 3]", [[3, "a "], [10, "a b"]]),
    ("a [[[b]]:2]", [[2, "a "], [10, "a [[b]]"]]),
    ("[(a:2):3]", [[3, ""], [10, "(a:2)"]]),
    ("a [b : c : 1] d", [[1, "a b  d"], [10, "a  c  d"]]),
    ("a[b:[c:d:2]:1]e", [[1, "abe"], [2, "ace"], [10, "ade"]]),
    ("a [unbalanced", [[10, "a [unbalanced"]]),
    ("a [b:.5] c", [[5, "a  c"], [10, "a b c"]]),
    ("a [{b|d{:.5] c", [[10, "a [{b|d{:.5] c"]]),
    ("((a][:b:c [d:3]", [[3, "((a][:b:c "], [10, "((a][:b:c d"]]),
    ("[a|(b:1.1)]", _alternating("a", "(b:1.1)")),
    ("[fe|]male", _alternating("female", "male")),
    ("[fe|||]male", _alternating("female", "male", "male", "male")),
    # when: a step number without ".", a fraction with one; int(), capped, ends < 1 dropped.
    ("[a:b:0]", [[10, "b"]]),
    ("[a:b:0.0]", [[10, "b"]]),
    ("[a:b:10]", [[10, "a"]]),
    ("[a:b:99]", [[10, "a"]]),
    ("[a:b:1.5]", [[10, "a"]]),
    ("[a:b:-2]", [[10, "b"]]),
    ("[a::3]", [[3, "a"], [10, ""]]),
    ("[:b:3]", [[3, ""], [10, "b"]]),
    ("[a:b:2.5e-1]", [[2, "a"], [10, "b"]]),
    ("[a:b:1e1]", [[10, "a"]]),
    ("[a:b:0.55]", [[5, "a"], [10, "b"]]),
    ("[a:b:+3]", [[3, "a"], [10, "b"]]),
    ("[a:b:3 ]", [[3, "a"], [10, "b"]]),
    ("[a:b: 0.5 ]", [[5, "a"], [10, "b"]]),
    # Malformed groups are text; a prompt the grammar cannot read is one plain entry.
    ("[a:b:x]", [[10, "[a:b:x]"]]),
    ("x [a:b:c:3]", [[10, "x [a:b:c:3]"]]),
    ("a | b [c:d:3]", [[10, "a | b [c:d:3]"]]),
    ("a\\", [[10, "a\\"]]),
    # Escapes, nesting, emphasis, BREAK, alternations together.
    ("a\\[b:c:3] [d:e:2]", [[2, "a\\[b:c:3] d"], [10, "a\\[b:c:3] e"]]),
    ("(x [a:b:3])", [[3, "(x a)"], [10, "(x b)"]]),
    ("[a [b:c:2]:d:5]", [[2, "a b"], [5, "a c"], [10, "d"]]),
    ("[[a|b]:c:4]", [*_alternating("a", "b", steps=4), *[[s, "c"] for s in range(5, 11)]]),
    ("[a|b|c] [d|e]", [[s, f"{'abc'[(s - 1) % 3]} {'de'[(s - 1) % 2]}"] for s in range(1, 11)]),
    ("(photo:1.2) of [a cat:a dog:4] BREAK [red|blue]",
     [[s, _PHOTO.format("cat" if s <= 4 else "dog", "red" if s % 2 else "blue")]
      for s in range(1, 11)]),
]
# A hires fix's second pass of H steps after a first pass of B (the WebUI's
# get_learned_conditioning_prompt_schedules(prompts, B, H), use_old_scheduling off): a `when`
# with "." becomes int((when - 1.0) * H), one without it when - B; capped at H, an end kept
# if >= 1, and step s of the pass uses the first part while s <= that end.
HIRES = [  # (prompt, B, H, its schedule in the hires pass)
    ("a [b:.5] c", 10, 10, [[10, "a b c"]]),  # the WebUI's docstring
    ("a [b:1.5] c", 10, 10, [[5, "a  c"], [10, "a b c"]]),
    ("[a:b:12]", 10, 10, [[2, "a"], [10, "b"]]),
    ("[a:b:3]", 10, 10, [[10, "b"]]),
    ("[a:b:0.5]", 20, 10, [[10, "b"]]),  # the first pass's fractions are all over
    ("[a:b:1.25]", 20, 10, [[2, "a"], [10, "b"]]),  # int(0.25 * 10)
    ("[a:b:1.]", 20, 10, [[10, "b"]]),  # a fraction: (1 - 1) * 10 = 0, dropped
    ("[a:b:2.0]", 20, 10, [[10, "a"]]),  # the whole pass
    ("[a:b:20]", 20, 10, [[10, "b"]]),  # 20 - 20 = 0: dropped
    ("[a:b:21]", 20, 10, [[1, "a"], [10, "b"]]),
    ("[a:b:25]", 20, 10, [[5, "a"], [10, "b"]]),
    ("[a:b:99]", 20, 10, [[10, "a"]]),  # capped at H
    ("[a:b:-1]", 20, 10, [[10, "b"]]),
    ("[a:b:1e1]", 5, 10, [[5, "a"], [10, "b"]]),  # no ".": a step number, 10 - 5
    ("[a:b:2.5e-1]", 5, 10, [[10, "b"]]),  # ".": (0.25 - 1) * 10 < 1
    ("[a::1.5]", 4, 6, [[3, "a"], [6, ""]]),
    ("[:b:6]", 4, 6, [[2, ""], [6, "b"]]),
    ("[a|b]", 20, 4, _alternating("a", "b", steps=4)),  # every hires step, from 1
    # An alternation anywhere ends an entry at every step, as the WebUI's does.
    ("[a [c|d]:b:1.5]", 10, 4, [[1, "a c"], [2, "a d"], [3, "b"], [4, "b"]]),
    ("[x:y:3] BREAK [a:b:1.5]", 2, 4, [[1, "x BREAK a"], [2, "y BREAK a"], [4, "y BREAK b"]]),
]
AND = [
    ("a AND b", [("a", 1.0), (" b", 1.0)]),
    ("a cat AND a hat :0.7", [("a cat", 1.0), (" a hat", 0.7)]),
    ("a:0.5", [("a", 0.5)]),
    ("a (b:1.2) AND c : -1.5", [("a (b:1.2)", 1.0), (" c", -1.5)]),
    ("ANDROID AND x", [("ANDROID", 1.0), (" x", 1.0)]),
    ("a AND", [("a", 1.0), ("", 1.0)]),
    ("a :1.", [("a", 1.0)]),
    ("a : .5 ", [("a", 0.5)]),
]


def test_schedules_and_and_split_are_the_webuis():
    prompts = [p for p, _ in SCHEDULES]
    assert prompt_schedules(prompts, 10) == [s for _, s in SCHEDULES]
    for prompt, base, steps, schedule in HIRES:
        assert prompt_schedules([prompt], base, steps) == [schedule], (prompt, base, steps)
        assert prompt_schedules([prompt], base, hires_steps=steps) == [schedule]
    for prompt, parts in AND:
        assert split_and(prompt) == parts, prompt
    # Deep nesting is text, never an error.
    assert prompt_schedules(["[" * 5000 + "a"], 3) == [[[3, "[" * 5000 + "a"]]]


def test_plan_tables_buckets_and_limits():
    assert prompt_editing.plan(["a (b:1.2) BREAK c ", "x"], ["", "[y]"], 4) is None
    stack = prompt_editing.plan(["[a:b:1]", "[a|b] AND c :0.5", "p"], ["", "", "[n:m:2]"], 4)
    assert (stack.entries, stack.parts, stack.composable) == (2, 2, True)
    # Position j uses the first entry whose end is >= j; padding parts weigh 0.
    text = [[stack.texts[i] for i in row] for row in stack.pos]
    assert text[0] == ["a", "b", "a", "b"] and text[1] == ["a", "b", " c", " c"]
    assert stack.table[0, 1].tolist() == [0, 0, 1, 1, 1]
    assert stack.table[1, 1].tolist() == [0, 0, 1, 0, 1]
    assert stack.table[2, 0].tolist() == [0, 0, 0, 1, 1]
    assert [stack.texts[i] for i in stack.neg[2]] == ["n", "m", "n", "n"]
    assert stack.weights.tolist() == [[1, 0], [1, 0.5], [1, 0]]
    # A hires pass after a first pass of 4: step numbers count on from 4, fractions from 1.0.
    hires = prompt_editing.plan(["[a:b:5]", "[a:b:0.5]"], ["", ""], 4, first_pass_steps=4)
    assert [[hires.texts[i] for i in row] for row in hires.pos] == [["a", "b"], ["b", "b"]]
    assert hires.table[:, 1].tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 0, 0]]
    assert prompt_editing.plan(["[a:b:0.5]"], [""], 4).table[0, 1].tolist() == [0, 0, 0, 1, 1]
    # A trailing weight alone is composable (the WebUI scales that prompt's guidance).
    assert prompt_editing.plan(["a :0.5"], [""], 4).spec_fields() == {
        "prompt_entries": 1, "prompt_parts": 1, "composable": True}
    many = "[a|b] [c|d|e] [f|g|h|i|j]"  # 2 * 3 * 5 combinations over 30 steps
    with pytest.raises(ValueError, match=r"^prompt makes 30 distinct prompts .*limit is 16 "
                                         r"\(MAX_SCHEDULE_PROMPTS\)$"):
        prompt_editing.plan([many], [""], 30)
    with pytest.raises(ValueError, match=r"^negative_prompt\[1\] makes 30 distinct"):
        prompt_editing.plan(["a", "b"], ["", many], 30)
    with pytest.raises(ValueError, match=r"^prompt has 9 AND parts; the limit is 8 "
                                         r"\(MAX_AND_PARTS\)$"):
        prompt_editing.plan([" AND ".join("x" * 9)], [""], 4)


def test_selector_and_guide_pick_each_rows_entry_by_evaluation():
    """The plug-ins on their own: each row's context is the entry its table names at
    evaluation ``index - first``; the guide is uncond + scale * sum_i w_i (cond_i - uncond)."""
    b, k, p, t = 2, 2, 2, 3
    entries = jnp.arange(2 * b * k * p * t, dtype=jnp.float32).reshape(2 * b, k * p * t, 1)
    table = jnp.asarray([[[0, 1, 1], [0, 1, 0], [1, 1, 0]],
                         [[1, 0, 0], [0, 0, 1], [0, 1, 1]]], jnp.int32)  # (b, 1 + P, positions)
    select = jax.jit(lambda cond, index, first: prompt_editing._selector(k, p, cfg=True)(
        None, {"prompt_steps": table}, sampling.Step(index, 0, 0, first), cond))
    cond = sampling.Conditioning(entries, {"time_ids": jnp.arange(2 * b)[:, None]})
    for index, first in ((0, 0), (3, 2), (2, 0), (9, 0)):
        j = min(index - first, 2)
        got = select(cond, jnp.int32(index), jnp.int32(first))
        want = [entries[r, table[r, 0, j] * t:(table[r, 0, j] + 1) * t] for r in range(b)]
        for part in range(p):
            want += [entries[b + r, (part * k + table[r, 1 + part, j]) * t:][:t]
                     for r in range(b)]
        np.testing.assert_array_equal(got.context, jnp.stack(want))
        assert got.added["time_ids"][:, 0].tolist() == [0, 1, 2, 3, 2, 3]
    eps = jnp.broadcast_to(jnp.arange(6, dtype=jnp.float32).reshape(6, 1, 1, 1) ** 2,
                           (6, 1, 1, 2))
    weights = jnp.asarray([[1.0, 0.5], [-1.0, 0.0]])
    guidance = jnp.asarray([[3.0, 0, 0, jnp.inf], [1.0, 0, 0, jnp.inf]])
    out = jax.jit(prompt_editing._guide(p))(None, {"prompt_weights": weights},
                                            sampling.Step(0, 0, jnp.float32(1)), eps, guidance)
    # Row 0: 0 + 3 * (1 * (4 - 0) + 0.5 * (16 - 0)); row 1 (scale <= 1: 1): 1 - (9 - 1).
    assert out[:, 0, 0, 0].tolist() == [36.0, -7.0]


X, Y, N = "a red circle", "a blue square", "green"


@pytest.fixture(scope="module")
def pipe(sd1_folder):
    return StableDiffusionPipeline.from_pretrained(str(sd1_folder), dtype="float32",
                                                   num_devices=1)


def test_identities_on_sd1(pipe):
    """DDIM, 3 steps: evaluations 0, 1, 2. One plain program and one with 2 entries and 2 parts;
    new texts, ends and weights within those buckets never recompile."""
    call = dict(num_inference_steps=3, scheduler="ddim", output_type="float")

    def one(prompt, guidance_scale=6.0, **kw):
        return pipe(prompt, seed=3, guidance_scale=guidance_scale, **call, **kw).images[0]

    x, y, xn = one(X), one(Y), one(X, negative_prompt=N)
    count = pipe.compile_count
    # Schedules of one text are that text, in the plain program: bit for bit.
    np.testing.assert_array_equal(one(f"[{X}:{Y}:9]"), x)
    np.testing.assert_array_equal(one(f"[{X}:{Y}:0]"), y)
    np.testing.assert_array_equal(one(f"[{Y}:{X}:0.2]"), x)  # int(0.2 * 3) = 0: dropped
    np.testing.assert_array_equal(one(X, negative_prompt=f"[{N}:{Y}:3]"), xn)
    assert pipe.compile_count == count

    def rows(prompts, negatives, scales):
        n = len(prompts)
        return pipe(prompts, negative_prompt=negatives, guidance_scale=scales, seeds=[3] * n,
                    image_indices=[0] * n, **call).images

    out = rows([f"{X} AND {X}", X, f"[{X}:{Y}:2]", f"[{X}:{Y}:1]", X, X],
               ["", "", "", "", f"[{N}:{Y}:2]", f"[{N}:{Y}:1]"], [3.0, 6, 6, 6, 6, 6])
    assert pipe.compile_count == count + 1
    np.testing.assert_allclose(out[0], x, atol=2e-5)  # x AND x at s is x at 2s
    np.testing.assert_allclose(out[1], x, atol=2e-5)
    # [X:Y:2] uses X at evaluations 0..2, all of them: X; [X:Y:1] switches before the last
    # (which moves the tiny model's image by ~1e-4).
    np.testing.assert_allclose(out[2], out[1], atol=1e-6)
    assert np.abs(out[3] - out[1]).max() > 2e-5 and np.abs(out[3] - y).max() > 1e-2
    np.testing.assert_allclose(out[4], xn, atol=2e-5)  # the negative's schedule alike
    assert np.abs(out[5] - xn).max() > 2e-5
    again = rows([f"{Y} AND {X}", f"{X} AND {Y}", f"[{X}|{Y}]", f"[{X}:{Y}:1]", f"{X} :0.5",
                  X], ["", "", "", "", "", ""], [6.0, 6, 6, 6, 12, 6])
    assert pipe.compile_count == count + 1  # new texts, ends, weights: the same program
    np.testing.assert_allclose(again[0], again[1], atol=1e-6)  # AND commutes
    # Alternation over evaluations 0, 1, 2: X (step 1), X (step 1), Y (step 2) = [X:Y:1].
    np.testing.assert_allclose(again[2], out[3], atol=1e-6)
    np.testing.assert_allclose(again[3], out[3], atol=1e-6)
    np.testing.assert_allclose(again[4], again[5], atol=2e-5)  # weight 0.5 at 12 = 1 at 6
    with pytest.raises(ValueError, match="MAX_AND_PARTS"):
        one(" AND ".join([X] * 9))
    assert pipe.compile_count == count + 1


def test_sdxl_stacks_both_encoders_and_the_pooled_output(sdxl_folder):
    pipe = sdjax.StableDiffusionXLPipeline.from_pretrained(str(sdxl_folder), dtype="float32",
                                                           num_devices=1)
    prompts = [f"[{X}:{Y}:1] AND {X}", f"{X} AND [{X}:{Y}:1]", f"{X} AND {X}", f"{X} :2",
               f"[{X}:{Y}:2]", X]
    out = pipe(prompts, num_inference_steps=3, scheduler="ddim", guidance_scale=3.0,
               height=16, width=16, seeds=[3] * 6, image_indices=[0] * 6,
               output_type="float").images
    for a, b in ((0, 1), (2, 3), (4, 5)):
        np.testing.assert_allclose(out[a], out[b], atol=1e-6)
    assert np.abs(out[0] - out[2]).max() > 2e-5 and np.abs(out[2] - out[5]).max() > 1e-3
    with pytest.raises(ValueError, match="prompt_2 cannot be given with prompt editing"):
        pipe(f"[{X}|{Y}]", prompt_2=X, num_inference_steps=3, height=16, width=16)


def test_server_groups_requests_by_their_prompts_layout(pipe, tmp_path):
    """Requests merge into one call only where their prompts compile alike, so a merged call
    never fails (chunk counts that share no bucket) or grows (AND passes for all)."""
    pytest.importorskip("pydantic")
    from types import SimpleNamespace

    from sdjax.serve.generation import plan_txt2img
    from sdjax.serve.limits import BadRequest, Limits
    from sdjax.serve.schemas import Txt2ImgRequest

    registry = SimpleNamespace(find=lambda wanted: "tiny", get=lambda title: pipe,
                               find_refiner=lambda name: None, lora_dir=tmp_path)

    def shape(prompt, negative_prompt=""):
        req = Txt2ImgRequest(prompt=prompt, negative_prompt=negative_prompt, steps=4,
                             width=64, height=64, sampler_name="Euler a")
        return plan_txt2img(req, registry, Limits()).shape

    plain, edited = shape("a cat"), shape("a [cat|dog]")
    assert plain.prompt_layout == (1, 1, 1, False) and plain == shape("a dog")
    assert edited.prompt_layout == (1, 2, 1, False) and edited == shape("a", "[x:y:2]")
    assert shape("a AND b").prompt_layout == (1, 1, 2, True) != plain.prompt_layout
    assert shape(", ".join(["a cat"] * 40)).prompt_layout[0] == 6  # 2 chunks: bucket 6
    with pytest.raises(BadRequest, match="MAX_AND_PARTS") as e:
        shape(" AND ".join("x" * 9))
    assert e.value.status == 422
