"""benchmarks.op_profile's op classes: read from a compiled module's HLO, with and without
XLA:CPU's YNNPACK hand-off (which wraps convolutions and dots in custom fusions)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.op_profile import CLASSES, classify_hlo, torch_class

NO_YNNPACK = {"xla_cpu_experimental_ynn_fusion_type": ""}


def _conv_dot_loop(x, w, m):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    tokens = y.reshape(-1, y.shape[-1])
    summed = jax.lax.map(lambda row: jnp.exp(row) @ m, tokens[:4])  # a while loop
    return (tokens @ m).sum(0) + summed.sum(0)


@pytest.mark.parametrize("options", [None, NO_YNNPACK], ids=["xla-defaults", "no-ynnpack"])
def test_classes_name_the_conv_the_matmul_and_the_loop(options):
    args = (np.ones((1, 8, 8, 16), np.float32), np.ones((3, 3, 16, 16), np.float32),
            np.ones((16, 16), np.float32))
    hlo = jax.jit(_conv_dot_loop, compiler_options=options).lower(*args).compile().as_text()
    classes = classify_hlo(hlo)
    assert set(classes.values()) <= set(CLASSES)
    found = set(classes.values())
    assert {"attention", "convolution"} <= found, classes
    # The dot may share a fusion with the convolution (YNNPACK graphs), so only without it
    # is a separate matmul certain.
    if options is not None:
        assert "matmul" in found, classes
    assert all(name.startswith("while") for name, c in classes.items() if c == "attention")


def test_classify_rejects_text_without_an_entry_computation():
    with pytest.raises(ValueError, match="ENTRY"):
        classify_hlo("HloModule m\n")


def test_torch_op_names_map_to_classes():
    assert torch_class("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert torch_class("aten::mkldnn_convolution") == "convolution"
    assert torch_class("aten::addmm") == torch_class("aten::bmm") == "matmul"
    assert torch_class("aten::native_group_norm") == "reduction"
    assert torch_class("aten::cat") == "copy/concat"
    assert torch_class("aten::silu") == torch_class("aten::add") == "elementwise"


def test_profile_charges_the_traced_time_to_classes():
    from benchmarks.op_profile import sdjax_profile

    args = (np.ones((2, 32, 32, 32), np.float32), np.ones((3, 3, 32, 32), np.float32),
            np.ones((32, 32), np.float32))
    per_class, wall_ms = sdjax_profile(_conv_dot_loop, args, runs=1, options=None)
    assert set(per_class) == set(CLASSES) and wall_ms > 0
    assert per_class["attention"] > 0 and per_class["convolution"] > 0, per_class
