"""Dataset generation parts used by ``python -m sdjax.generate``: streamed prompt files,
webdataset shards, the run manifest and the threaded shard writer."""
