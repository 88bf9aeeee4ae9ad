"""Encoding and writing shards on host threads while the devices compute the next batch.

``put(samples, images)`` hands a finished batch to a pool of encoder threads (Pillow's encoders
release the GIL) and queues it for a single writer thread, which appends the encoded samples to
the current shard in index order and publishes each shard as it fills. The queue is bounded, so
when the host falls behind the generating loop waits instead of piling images up in memory.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from sdjax.dataset.shards import Layout, ShardWriter
from sdjax.dataset.storage import Store

# (sample, image) -> files of the sample; a sample is anything with an ``index`` attribute
Encode = Callable[[Any, np.ndarray], dict[str, bytes]]


class AsyncShardWriter:
    def __init__(self, store: Store, layout: Layout, encode: Encode, *, threads: int,
                 depth: int = 2, shard_stats: dict | None = None,
                 on_written: Callable[[int], None] | None = None,
                 on_shard: Callable[[dict], None] | None = None):
        self.store, self.layout, self.encode = store, layout, encode
        self.shard_stats = shard_stats or {}
        self.on_written = on_written or (lambda n: None)
        self.on_shard = on_shard or (lambda stats: None)
        self.shards_written: list[dict] = []
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sdjax-encode")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._current: ShardWriter | None = None
        # A shard's time is the wall time since the previous one was published (the first
        # also pays for compilation), so its images/s is the rate the run actually made.
        self._last_commit = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="sdjax-writer", daemon=True)
        self._thread.start()

    def put(self, samples: Sequence[Any], images: np.ndarray) -> None:
        """Queue one batch (samples with an ``index``, their uint8 images); blocks while
        ``depth`` batches are already waiting. Raises the writer thread's error, if any."""
        self._raise_if_failed()
        item = [(s.index, self._pool.submit(self.encode, s, img))
                for s, img in zip(samples, images, strict=True)]
        while True:
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                self._raise_if_failed()

    def close(self) -> None:
        """Wait until everything queued is written; raise the first error if any."""
        self._queue.put(None)
        self._thread.join()
        self._pool.shutdown()
        self._raise_if_failed()
        if self._current is not None:  # only a bug in the caller's planning can leave one
            self._current.abort()
            raise RuntimeError(f"shard {self._current.shard} was left incomplete")

    def abort(self) -> None:
        """Stop at once (on an error or interrupt elsewhere); the unfinished shard is dropped,
        shards already published stay."""
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put(None)
        self._thread.join()
        self._pool.shutdown(cancel_futures=True)
        if self._current is not None:
            self._current.abort()
            self._current = None

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None or self._stop.is_set():
                continue  # keep draining so put() never blocks on a dead writer
            try:
                self._write(item)
            except BaseException as e:  # handed to the generating thread by put()/close()
                self._error = e
                if self._current is not None:
                    self._current.abort()
                    self._current = None

    def _write(self, item: list[tuple[int, Future]]) -> None:
        for index, future in item:
            files = future.result()
            if self._stop.is_set():
                return
            shard = self.layout.shard_of(index)
            if self._current is None:
                self._current = ShardWriter(self.store, self.layout, shard, self._last_commit)
            self._current.add(index, files)
            if self._current.full:
                stats = self._current.commit(self.shard_stats)
                self._last_commit = time.perf_counter()
                self._current = None
                self.shards_written.append(stats)
                self.on_shard(stats)
        self.on_written(len(item))
