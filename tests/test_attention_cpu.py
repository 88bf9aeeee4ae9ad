"""The CPU attention's loop over heads and query blocks (layers._attention_cpu) against
softmax attention in float64 numpy, at sizes small enough to test but with the step budget cut so
that every path runs: several heads per step, a loop over query blocks, a last partial block,
the causal mask across block boundaries."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from sdjax.models import layers


def _reference(q, k, v, causal):
    """softmax(q k^T / sqrt(d)) v in float64 numpy, on (B, T, N, D)."""
    logits = np.einsum("btnd,bsnd->bnts", q, k, dtype=np.float64) / np.sqrt(q.shape[-1])
    if causal:
        logits = np.where(np.tri(q.shape[1], k.shape[1], dtype=bool), logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bnts,bsnd->btnd", w / w.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("t, s, heads, causal, budget", [
    (150, 150, 3, True, 64 * 150),   # blocks of 64 queries, a tail of 22, a causal mask
    (100, 7, 4, False, 1 << 19),     # cross-attention shape: all queries, 8 heads a step
])
def test_blocked_attention_matches_reference(monkeypatch, t, s, heads, causal, budget):
    monkeypatch.setattr(layers, "_CPU_BLOCK_ELEMENTS", budget)
    group, block = layers._cpu_blocks(2 * heads, t, s, 8)
    assert (block < t) == (t * s > budget)  # the case the row means to cover
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, t, heads * 8), np.float32)
    k, v = (rng.standard_normal((2, s, heads * 8), np.float32) for _ in range(2))
    got = np.asarray(jax.jit(lambda q, k, v: layers._attention_cpu(
        q.reshape(2, t, heads, 8), k.reshape(2, s, heads, 8), v.reshape(2, s, heads, 8),
        causal))(q, k, v))
    want = _reference(q.reshape(2, t, heads, 8), k.reshape(2, s, heads, 8),
                      v.reshape(2, s, heads, 8), causal)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)


def test_step_sizes_at_sd_shapes():
    # SD 1.5 at 512²: 4096 tokens, 8 heads of 40, batch 2 -> one head and 128 queries a step
    # (2 MB of logits); the VAE's one 512-wide head gets 4x that; cross-attention over 77
    # tokens takes all queries of two heads a step.
    assert layers._cpu_blocks(16, 4096, 4096, 40) == (1, 128)
    assert layers._cpu_blocks(1, 4096, 4096, 512) == (1, 512)
    assert layers._cpu_blocks(16, 4096, 77, 40) == (2, 4096)
