"""Checkpoint conversion CLI.

  python -m starjax.models.convert --from gguf --to starjax --input smollm2-135m --output DIR
  python -m starjax.models.convert --from hf --to starjax --input HF_DIR --output DIR
  python -m starjax.models.convert --from starjax --to hf --input DIR --output HF_DIR

Inputs: `--from hf` a HF directory (config.json + safetensors), `--from gguf` a .gguf file or a
built-in name ("smollm2-135m"), `--from starjax` a starjax directory. Outputs: `--to starjax` the
starjax format (see `starjax.models.registry`), `--to hf` a directory transformers loads with
`from_pretrained`. The tokenizer and chat template travel along; by default the vocabulary grows
to include the thought tokens (`--no-thought-tokens` keeps the checkpoint's own size).

The output is written to a temporary sibling directory and renamed into place when complete; an
existing output is refused unless `--force`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from starjax.models import hf, registry

SOURCES = ("hf", "gguf", "starjax")
TARGETS = ("starjax", "hf")


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m starjax.models.convert",
                              description="Convert model checkpoints between HF safetensors, "
                              "GGUF and the starjax format.")
  p.add_argument("--from", dest="source", choices=SOURCES, required=True,
                 help="input format")
  p.add_argument("--to", dest="target", choices=TARGETS, required=True, help="output format")
  p.add_argument("--input", required=True,
                 help="input directory, .gguf file, or built-in name "
                 f"({', '.join(registry.builtin_names())})")
  p.add_argument("--output", required=True, help="output directory (must not exist)")
  p.add_argument("--force", action="store_true", help="replace an existing output directory")
  p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                 help="tensor dtype in the output files (default float32)")
  p.add_argument("--no-thought-tokens", dest="thought_tokens", action="store_false",
                 help="keep the checkpoint's vocabulary size (no thought-token rows)")
  p.add_argument("--max-shard-bytes", type=int, default=4 << 30,
                 help="--to hf: split safetensors files larger than this")
  return p


def convert(source: str, target: str, input_path: str, output: str, *, force: bool = False,
            dtype: str = "float32", thought_tokens: bool = True,
            max_shard_bytes: int = 4 << 30) -> str:
  """Library form of the CLI; returns the absolute output directory.

  Raises:
    FileExistsError: `output` exists and not `force` (checked before loading anything).
    ValueError: `input_path` is not of kind `source`, or the checkpoint is unsupported.
  """
  if source not in SOURCES or target not in TARGETS:
    raise ValueError(f"--from must be one of {SOURCES} and --to one of {TARGETS}.")
  if os.path.lexists(output) and not force:
    raise FileExistsError(f"{os.path.abspath(output)} already exists; pass --force to replace it.")
  kind, _ = registry.resolve(input_path)
  if kind != source:
    raise ValueError(f"--from {source}, but {input_path!r} is a {kind} checkpoint.")
  model = registry.load(input_path, thought_tokens=thought_tokens, to_device=False)
  if target == "hf":
    return hf.save_hf(model.cfg, model.params, output, model.tokenizer,
                      chat_template=model.chat_template, dtype=dtype,
                      max_shard_bytes=max_shard_bytes, overwrite=force)
  return registry.save_starjax(model.cfg, model.params, output, model.tokenizer,
                               chat_template=model.chat_template, dtype=dtype, overwrite=force)


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  start = time.time()
  try:
    out = convert(args.source, args.target, args.input, args.output, force=args.force,
                  dtype=args.dtype, thought_tokens=args.thought_tokens,
                  max_shard_bytes=args.max_shard_bytes)
  except (FileExistsError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {args.target} checkpoint to {out} ({time.time() - start:.1f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
