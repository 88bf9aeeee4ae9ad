"""The WebUI's prompt syntax (sdjax.prompts): the attention parser, 75-token chunks, the
emphasis arithmetic against a float64 NumPy restatement of the WebUI's formula, clip_skip
against transformers, long prompts in the compiled call, and <lora:…> tags in the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdjax import prompts
from sdjax.pipeline import StableDiffusionPipeline
from sdjax.weights.diffusers_folder import load_tokenizer

SIZE, STEPS = 16, 2
R, S = 1.1, 1 / 1.1
WORDS = "a red circle on a blue background".split()

# prompt -> the runs the WebUI's parse_prompt_attention gives (its docstring's examples first;
# the rest reasoned from its algorithm: "(" and "[" push the run index, ")" / "]" / ":w)"
# multiply the runs since then, unmatched closers are text, open brackets close at the end,
# neighbours of equal weight merge).
PARSES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", R), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", R)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", R)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.3 * R * R), (" ", R), ("on", 1.0), (" a ", R),
      ("hill", 0.55), (", sun, ", R), ("sky", R ** 4), (".", R)]),
    ("((x))", [("x", R * R)]),
    ("[x]", [("x", S)]),
    ("[[x]] y", [("x", S * S), (" y", 1.0)]),
    ("(x:1.3)", [("x", 1.3)]),
    ("((x:0.5))", [("x", 0.5 * R)]),
    ("(a [b] c)", [("a ", R), ("b", R * S), (" c", R)]),
    ("[unclosed", [("unclosed", S)]),
    ("a) b] c", [("a) b] c", 1.0)]),          # closers without an opener are text
    ("x:1.5) y", [("x:1.5) y", 1.0)]),        # a weight outside brackets is text
    ("(x:abc)", [("x:abc", R)]),              # not a weight: text, closed as (x)
    ("(x:-1)", [("x", -1.0)]),                # the WebUI takes a negative weight as given
    ("(x:1.2.3)", [("x:1.2.3", R)]),          # the WebUI raises here; we read text
    ("a\\\\b \\x", [("a\\b x", 1.0)]),        # \\ is a backslash; a lone \ vanishes
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("aBREAK b", [("aBREAK b", 1.0)]),        # BREAK only as a word
    ("[a:b:0.5] [a|b]", [("a:b:0.5", S), (" ", 1.0), ("a|b", S)]),  # editing: not supported
    ("", [("", 1.0)]),
]


@pytest.mark.parametrize(("text", "expected"), PARSES, ids=[p[0] or "empty" for p in PARSES])
def test_parser_reads_prompts_as_the_webui(text, expected):
    runs = prompts.parse_attention(text)
    assert [t for t, _ in runs] == [t for t, _ in expected]
    assert [w for _, w in runs] == pytest.approx([w for _, w in expected], rel=1e-12)


@pytest.fixture(scope="module")
def pipe(sd1_folder):
    return StableDiffusionPipeline.from_pretrained(str(sd1_folder), dtype="float32",
                                                   num_devices=1)


def _ids(pipe, words):
    return pipe.tokenizer(" ".join(words), add_special_tokens=False).input_ids


def test_chunks_wrap_pad_break_and_backtrack_as_the_webui(pipe, sd2_folder):
    tok = pipe.tokenizer
    bos, eos = tok.bos_token_id, tok.eos_token_id
    # A plain prompt is the tokenizer's own padded ids (what diffusers encodes), weights 1.
    for t in (tok, load_tokenizer(sd2_folder)):  # SD2 pads with "!" after the end token
        c = prompts.chunk_prompt("a red circle on a blue background", t)
        plain = t("a red circle on a blue background", padding="max_length",
                  max_length=77).input_ids
        assert c.ids.tolist() == [plain] and not c.weighted
    # Weights follow their tokens; the start, end and padding keep weight 1.
    c = prompts.chunk_prompt("a (red:1.5) [circle]", tok)
    n = len(_ids(pipe, ["a", "red", "circle"]))
    assert c.weights[0, :n + 3].tolist() == pytest.approx([1, 1, 1.5, S, 1][:n + 2] + [1])
    # 200 tokens: 75 + 75 + 50, each chunk wrapped in start/end.
    long = ("red " * 200).strip()
    c = prompts.chunk_prompt(long, tok)
    assert c.ids.shape == (3, 77)
    assert (c.ids[:, 0] == bos).all() and (c.ids[:2, 76] == eos).all()
    assert c.ids[2, 51] == eos and (c.ids[2, 52:] == tok.pad_token_id).all()
    # BREAK starts a new chunk.
    assert prompts.chunk_prompt("red BREAK blue", tok).ids.shape == (2, 77)
    # A comma among the last 20 tokens of a full chunk: what follows it moves on.
    text = " ".join(["red"] * 70) + ", " + " ".join(["blue"] * 10)
    c = prompts.chunk_prompt(text, tok)
    comma = tok.get_vocab()[",</w>"]
    assert c.ids[0, 71] == comma and c.ids[0, 72] == eos       # 70 + comma, then the end
    assert (c.ids[1, 1:11] == _ids(pipe, ["blue"])[0]).all()   # the 10 blues moved


def test_context_buckets_repeat_chunks():
    assert prompts.context_chunks([1, 1]) == 1
    assert prompts.context_chunks([2, 3, 1]) == 6
    assert prompts.context_chunks([4]) == 12 and prompts.context_chunks([5]) == 5
    # lcm within the limit: repeated; past it, the longest count (the others padded)
    assert prompts.context_chunks([4, 5]) == 20 and prompts.context_chunks([5, 7]) == 7
    assert prompts.exact([5], 20) and not prompts.exact([5, 7], 7)
    with pytest.raises(ValueError, match="past the limit of 24 chunks"):
        prompts.context_chunks([1, 25])
    # padding is the WebUI's pad_cond: the prompt, then the empty prompt's chunk
    c = prompts.Chunks(np.arange(10).reshape(2, 5), np.full((2, 5), 2.0))
    e = prompts.Chunks(np.full((1, 5), -1), np.ones((1, 5)))
    ids, w = prompts.fit_chunks(c, 5, e)
    assert (ids[:2] == c.ids).all() and (ids[2:] == -1).all() and (w[2:] == 1).all()
    assert (prompts.fit_chunks(c, 4, e).ids == np.tile(c.ids, (2, 1))).all()


def test_emphasis_and_clip_skip_match_a_float64_restatement(pipe, sd1_folder):
    import jax
    from transformers import CLIPTextModel

    ref_te = CLIPTextModel.from_pretrained(str(sd1_folder / "text_encoder")).double().eval()
    text = ["a (red:1.4) circle, [[blue]] BREAK (background:0.7) " + "red " * 80,
            "a red circle"]
    ids, weights = pipe.tokenize(text)
    assert ids.shape == (2, 6, 77)  # 3 chunks and 1 chunk share a context of 6
    te = pipe.network("text_encoder")
    # transformers' newer CLIPTextModel is flat; older ones nest the tower in text_model
    norm = getattr(ref_te, "text_model", ref_te).final_layer_norm
    for skip in (1, 2):
        ours = np.asarray(jax.jit(lambda i, w, s=skip: prompts.encode(te, i, w, s))(ids, weights))
        flat = torch.from_numpy(ids.reshape(-1, 77).astype(np.int64))
        with torch.no_grad():
            out = ref_te(flat, output_hidden_states=True)
            z = (out.last_hidden_state if skip == 1 else
                 norm(out.hidden_states[-skip])).numpy()
        # The WebUI's "Original" emphasis, per chunk: z *= w; z *= mean(z) / mean(z * w).
        w = weights.reshape(-1, 77, 1).astype(np.float64)
        want = z * w
        want *= z.mean(axis=(1, 2), keepdims=True) / want.mean(axis=(1, 2), keepdims=True)
        want = want.reshape(2, 6 * 77, -1)
        assert np.abs(ours - want).max() / np.abs(want).max() < 1e-5
        # a chunk of weight 1 is the encoder's output (the second prompt, repeated)
        assert np.abs(ours[1] - z.reshape(2, 6 * 77, -1)[1]).max() < 1e-5
    assert not np.allclose(prompts.encode(te, ids, weights, 1), prompts.encode(te, ids, weights, 2))


def _run(pipe, prompt, **kw):
    # The shape sdjax.sample compiles for one image at a time: the CLI test reuses it.
    return pipe(prompt, num_inference_steps=STEPS, height=SIZE, width=SIZE, seed=0,
                **kw).images.astype(np.int16)


def test_long_and_weighted_prompts_share_executables(pipe, monkeypatch, capfd):
    plain = _run(pipe, "a red circle")
    base = pipe.compile_count
    # Syntax whose weights are all 1 changes nothing, bit for bit.
    assert np.array_equal(_run(pipe, "(a red circle:1.0)"), plain)
    # Weights are runtime arrays: they change the image, not the executable.
    assert not np.allclose(_run(pipe, "a (red:1.6) circle"), plain)
    assert pipe.compile_count == base
    # Odd syntax is text, never a failure.
    _run(pipe, "a (red:abc) ((circle [blue) \\( x:-1) (y:1.2.3)")
    long150, long200 = ("red " * 150).strip(), ("blue " * 200).strip()
    assert prompts.chunk_prompt(long200, pipe.tokenizer).ids.shape[0] == 3
    assert prompts.chunk_prompt(long150, pipe.tokenizer).ids.shape[0] == 2
    _run(pipe, long200)
    assert pipe.compile_count == base + 1
    # Nothing is truncated: no warning of ours, nor transformers' "sequence length" one.
    assert "Token indices sequence length" not in capfd.readouterr().err
    _run(pipe, long150, negative_prompt="blue")
    assert pipe.compile_count == base + 1  # 150 and 200 tokens: one executable
    # Repeating a prompt's chunks to fill the context is neutral: one chunk repeated 6 times
    # gives the one-chunk image (up to float rounding, here a uint8 step at most).
    monkeypatch.setattr(prompts, "CONTEXT_BUCKETS", (6,))
    assert np.abs(_run(pipe, "a red circle") - plain).max() <= 1
    assert pipe.compile_count == base + 1


def test_lora_tags_in_the_cli(pipe, sd1_folder, tmp_path, monkeypatch, capfd):
    from PIL import Image

    from sdjax.sample import main
    from tests.test_adapters import write_kohya_lora

    (tmp_path / "loras" / "styles").mkdir(parents=True)
    lora = write_kohya_lora(tmp_path / "loras" / "styles" / "glow.safetensors")
    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained",
                        classmethod(lambda cls, *args, **kw: pipe))
    before = pipe.params
    tagged = "a red <lora:glow:0.5>circle"
    out = tmp_path / "out"
    # Two LoRA sets: two calls (one LoRA set per call), images numbered as given.
    assert main(["--model", str(sd1_folder), "--prompt", tagged, "--prompt", "a red circle",
                 "--steps", str(STEPS), "--height", str(SIZE), "--width", str(SIZE),
                 "--batch_size", "1", "--lora_dir", str(tmp_path / "loras"),
                 "--outdir", str(out)]) == 0
    first, second = sorted(out.glob("*.png"))
    assert Image.open(first).text["parameters"].split("\n")[0] == tagged  # as written
    # the tag says what it loaded as --lora does; the PNG names the file's hash as the WebUI
    from tests.test_adapters import _addnet_hash
    assert "LoRA glow x0.5\n" in capfd.readouterr().err
    assert f'Lora hashes: "glow: {_addnet_hash(lora)[:12]}"' in Image.open(first).text[
        "parameters"]
    assert "Lora hashes" not in Image.open(second).text["parameters"]
    assert pipe.loras == {}  # the tag's LoRA is gone for the untagged prompt
    plain = _run(pipe, "a red circle", image_indices=[1])
    assert np.array_equal(np.asarray(Image.open(second), np.int16), plain[0])
    pipe.load_lora(lora, 0.5)
    try:
        want = _run(pipe, "a red circle", image_indices=[0])
        assert np.array_equal(np.asarray(Image.open(first), np.int16), want[0])
        assert not np.array_equal(want, plain)
    finally:
        pipe.unload_lora(lora)
    # Unloading restores the weights exactly.
    import jax
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before),
                                                    jax.tree.leaves(pipe.params), strict=True))
