"""float32 means float32: the sampler of a float32 pipeline asks for full-precision dots and
convolutions (XLA's default on GPUs/TPUs is TF32 / bfloat16 passes); half-precision pipelines
and an explicit ``matmul_precision="default"`` leave XLA its default.

The check reads the sampler's StableHLO, which carries the precision of each dot and
convolution to every backend's compiler, so a CPU run shows what a GPU or TPU is asked for."""

import re

import pytest

from sdjax.pipeline import StableDiffusionPipeline

_OP = re.compile(r"stablehlo\.(dot_general|convolution)\b")
# dot_general prints "precision = [HIGHEST, HIGHEST]", convolution
# "precision_config = [#stablehlo<precision HIGHEST>, ...]".
_PRECISION = re.compile(r"precision(?:_config)? = \[([^\]]*)\]")


def _precisions(pipe: StableDiffusionPipeline) -> dict[str, set[str]]:
    """The precisions in the lowered sampler; one step, latents out, so it traces in
    seconds."""
    return precisions_in(pipe.lower(["a cat"], num_inference_steps=1, height=32, width=32,
                                    output_type="latent").as_text())


def precisions_in(text: str) -> dict[str, set[str]]:
    """{"dot_general"|"convolution": the operand precisions found on those ops ("unset" where
    an op has none)} in a lowered program's StableHLO text."""
    found: dict[str, set[str]] = {}
    for line in text.splitlines():
        op = _OP.search(line)
        if op:
            m = _PRECISION.search(line)
            names = re.findall(r"\b(DEFAULT|HIGHEST|HIGH)\b", m.group(1)) if m else ["unset"]
            found.setdefault(op.group(1), set()).update(names)
    return found


@pytest.mark.parametrize("dtype, option, expected", [
    ("float32", None, "highest"),
    ("float32", "default", "default"),
    ("bfloat16", None, None),
])
def test_sampler_precision(sd1_folder, dtype, option, expected):
    pipe = StableDiffusionPipeline.from_pretrained(str(sd1_folder), dtype=dtype, num_devices=1,
                                                   matmul_precision=option)
    assert pipe.matmul_precision == expected
    found = _precisions(pipe)
    # The text encoder and UNet have both kinds of op; every one of them must say it.
    assert set(found) == {"dot_general", "convolution"}, found
    for op, names in found.items():
        if expected == "highest":
            assert names == {"HIGHEST"}, (op, names)
        else:
            assert "HIGHEST" not in names and "HIGH" not in names, (op, names)


def test_unknown_precision_is_a_clear_error(sd1_folder):
    with pytest.raises(ValueError, match="matmul_precision must be one of"):
        StableDiffusionPipeline.from_pretrained(str(sd1_folder), dtype="float32",
                                                num_devices=1, matmul_precision="tf32")


@pytest.mark.parametrize("argv, expected", [([], None),
                                            (["--matmul-precision", "default"], "default")])
def test_cli_flag_reaches_from_pretrained(argv, expected):
    from sdjax.cli_args import ModelOptions
    from sdjax.generate import build_parser as generate_parser
    from sdjax.sample import build_parser as sample_parser
    sample = sample_parser().parse_args(["--prompt", "x", *argv])
    generate = generate_parser().parse_args(["--prompts", "p.txt", "--outdir", "o", *argv])
    for args in (sample, generate):
        assert ModelOptions.from_args(args).kwargs()["matmul_precision"] == expected
