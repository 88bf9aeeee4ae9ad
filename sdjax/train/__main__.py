"""python -m sdjax.train --config RECIPE.py|.json [--set key=value ...]"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from sdjax.cli_args import Parser


def parse_sets(items: list[str]) -> dict:
    """``optim.learning_rate=3e-4`` -> {"optim.learning_rate": 3e-4}; values are JSON when
    they parse as JSON, strings otherwise."""
    out = {}
    for item in items:
        key, eq, raw = item.partition("=")
        if not eq:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m sdjax.train",
               description="Train a UNet, VAE or CLIP text encoder, or a textual inversion or "
               "LoRA of a model, from a recipe; resumes from the output folder's checkpoints.")
    p.add_argument("--config", required=True, type=Path, help="recipe (.py or .json)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set steps=100 --set "
                        "optim.learning_rate=3e-4 (repeatable)")
    p.add_argument("--output_dir", "--output-dir", help="shorthand for --set output_dir=...")
    p.add_argument("--stop_at", "--stop-at", type=int, default=None,
                   help="stop (with a checkpoint) after this many steps; rerun to resume")
    args = p.parse_args(argv)

    from sdjax.train.config import load_config, override
    from sdjax.weights.errors import WeightsError

    try:
        cfg = load_config(args.config)
        sets = parse_sets(args.set)
        if args.output_dir:
            sets["output_dir"] = args.output_dir
        cfg = override(cfg, sets)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from sdjax.train.loop import train

    out = Path(cfg.output_dir)
    existed = out.exists()
    try:
        result = train(cfg, stop_at=args.stop_at)
    except (WeightsError, ValueError, OSError) as e:
        _remove_if_unused(out, existed)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _remove_if_unused(out, existed)
        print(f"interrupted; {out} keeps the last checkpoint, if any: run the same command to "
              "resume", file=sys.stderr)
        return 130
    last = result.history[-1] if result.history else {}
    print(f"step {result.step}/{cfg.steps}, loss {last.get('loss', float('nan')):.4f}, "
          f"log {Path(cfg.output_dir) / 'log.jsonl'}")
    if result.export_dir is not None:
        print(f"exported to {result.export_dir}")
    return 0


def _remove_if_unused(out: Path, existed: bool) -> None:
    """A run that this invocation started in a new folder and that stopped before its first
    checkpoint leaves nothing worth keeping: remove the folder rather than leave junk (a
    config.json and an empty log) that looks like a run."""
    checkpoints = out / "checkpoints"
    saved = checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())
    if not existed and out.is_dir() and not saved:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
