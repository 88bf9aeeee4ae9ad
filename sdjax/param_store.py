"""A pipeline's parameters, kept beside it: the networks' graph definitions and parameters,
their background load and the waiting for it, LoRA merging over the untouched originals, and
the growth of the token tables by textual-inversion embeddings.

The pipeline asks for parameters (:attr:`ParamStore.params`, which waits for the reads) or
for their shapes (:attr:`ParamStore.current`, which does not: a call compiles while the
weights load); everything that changes weights goes through here, in the loading thread
when the reads are still running. A new network (a ControlNet) is one more entry.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from sdjax import parallel, validation


def lora_key(path: str | Path) -> str:
    """How a loaded LoRA file is named: its resolved path."""
    return str(Path(path).expanduser().resolve())


class ParamStore:
    """Graph definitions and parameters by network name (``"text_encoder"``, ``"unet"``,
    ``"vae"``, ``"text_encoder_2"``, ...), replicated on ``mesh``."""

    def __init__(self, modules: Mapping[str, nnx.Module], mesh):
        self.mesh = mesh
        self.graphdefs: dict[str, nnx.GraphDef] = {}
        self._params: dict[str, nnx.State] = {}
        for name, module in modules.items():
            self.add(name, module)
        self._loading: Future | None = None  # weights still being read (background_load)
        # Time callers spent blocked on background reads, so the CLIs can keep it out of
        # their generation figures.
        self.wait_seconds = 0.0
        # LoRAs: file -> (its layers, scale), and the un-merged weights they touch, so a new
        # scale re-merges exactly from the originals. Embeddings: name -> its tokens.
        self._loras: dict[str, tuple] = {}
        self._pristine: dict[tuple[str, tuple], jax.Array] = {}
        self.embedding_tokens: dict[str, list[str]] = {}
        self.embedding_files: dict[str, str] = {}  # token -> the file it came from

    def add(self, name: str, module: nnx.Module) -> None:
        self.graphdefs[name], self._params[name] = nnx.split(module)

    def place(self, array) -> jax.Array:
        """Where parameters live: replicated on every device of the mesh."""
        return jax.device_put(array, parallel.replicated(self.mesh))

    # ------------------------------------------------------------------ reading
    @property
    def params(self) -> dict[str, nnx.State]:
        """The parameters, once they are read (:meth:`wait`)."""
        self.wait()
        return self._params

    @params.setter
    def params(self, value: dict[str, nnx.State]) -> None:
        self.wait()
        self._params = value

    @property
    def current(self) -> dict[str, nnx.State]:
        """The parameters as they are now, without waiting: abstract (shapes, dtypes and
        shardings) while a background load runs, which is all compiling needs."""
        return self._params

    @property
    def pending(self) -> bool:
        """Whether background work (reads, or a change queued after them) was started and
        not yet waited for: the parameters a call planned with may be replaced."""
        return self._loading is not None

    @property
    def loading(self) -> bool:
        """Whether background reads (or a change queued after them) are still running."""
        return self._loading is not None and not self._loading.done()

    def network(self, name: str) -> nnx.Module:
        return nnx.merge(self.graphdefs[name], self.params[name])

    def fill_in_background(self, deferred) -> None:
        """Read the tensors ``deferred`` (a ``weights.loader.DeferredPlace``) holds for these
        networks in a background thread; a network replaced after loading is not read."""
        wanted = [var for state in self._params.values()
                  for _, var in nnx.to_flat_state(state)]
        self._in_background(lambda: deferred.fill(wanted))

    def _in_background(self, work: Callable[[], None]) -> None:
        pool = ThreadPoolExecutor(1, thread_name_prefix="sdjax-load")
        self._loading = pool.submit(work)
        pool.shutdown(wait=False)

    def after_weights(self, step: Callable[[], None]) -> None:
        """Run ``step`` (which changes the weights) once they are read: now, or after the
        background reads in their thread, so that calls still compile meanwhile."""
        loading = self._loading
        if loading is None or loading.done():
            self.wait()  # raises what the reads raised
            step()
            return

        def then() -> None:
            loading.result()
            step()

        self._in_background(then)

    def wait(self) -> None:
        """Return once the weights are read; raises what reading them raised."""
        loading = self._loading
        if loading is not None:
            t0 = time.perf_counter()
            try:
                loading.result()
            finally:
                self.wait_seconds += time.perf_counter() - t0
            self._loading = None

    # ------------------------------------------------------------------ LoRA
    @property
    def loras(self) -> dict[str, float]:
        """The LoRA files merged into the weights (resolved paths) and their scales."""
        return {key: scale for key, (_, scale) in self._loras.items()}

    def lora_name(self, path: str | Path) -> str:
        return self._loras[lora_key(path)][0].name

    def set_loras(self, wanted: Mapping[str | Path, float],
                  prefixes: Mapping[str, tuple[str, str]]) -> None:
        """Make exactly ``wanted`` ({LoRA file: scale}) the merged LoRAs, in one re-merge from
        the original weights; ``prefixes`` (:mod:`sdjax.weights.lora`) name the networks a
        file may change. Files already loaded are not read again, and an unchanged set
        changes nothing. A file that does not fit raises ``ValueError`` and leaves the
        weights as they were. While the weights still load, the files are read and checked
        now (against the shapes) and merged after the reads, in the loading thread."""
        from sdjax.weights.lora import merge_loras, read_lora, restore_pristine

        wanted = {lora_key(path): validation.check_number(scale, "scale")
                  for path, scale in wanted.items()}
        if wanted == self.loras:
            return
        networks = None  # for the shapes a new file is checked against
        loras = {}
        for key, scale in wanted.items():
            if key in self._loras:
                lora = self._loras[key][0]
            else:
                networks = networks or {net: nnx.merge(self.graphdefs[net], self._params[net])
                                        for net in prefixes}
                lora = read_lora(Path(key), networks, prefixes)
            loras[key] = (lora, scale)

        def merge() -> None:
            self._params, self._pristine = merge_loras(
                restore_pristine(self._params, self._pristine), {}, loras.values(), self.place)

        self.after_weights(merge)
        self._loras = loras

    # ------------------------------------------------------------------ embeddings
    def add_tokens(self, token: str, tables: Sequence[tuple[str, object, np.ndarray]],
                   source: str) -> list:
        """Add ``token``'s vectors to each (text encoder, its tokenizer, vectors) of
        ``tables``, all checked before any is changed; returns the grown tokenizers, in the
        order of ``tables``. The token tables change size: executables compiled for the
        old size no longer apply."""
        from sdjax.weights import embeddings

        grown = []
        for net, tokenizer, vectors in tables:
            te = self.network(net)
            tokenizer, table = embeddings.add_embedding(
                tokenizer, embeddings.token_table(te), token, vectors, source=source)
            grown.append((net, te, tokenizer, table))
        for net, te, _, table in grown:
            embeddings.set_token_table(te, table, self.place)
            self.graphdefs[net], self._params[net] = nnx.split(te)
        self.embedding_tokens[token] = embeddings.token_names(token, tables[0][2].shape[0])
        self.embedding_files[token] = source
        return [tokenizer for _, _, tokenizer, _ in grown]
