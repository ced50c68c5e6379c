r"""Generate text with thoughts from a Quiet-STaR training run (cached inference, `inference`).

  python -m starjax.quiet_star.generate --workdir=runs/quiet_star_demo \
    --prompt "Q: Tom has 3 apples and buys 4 more. How many?\nA:" [--prompt ...] \
    [--max_new_tokens=32 --seed=0 --greedy --temperature=0.9 --no_thoughts --step=N \
     --json=out.json]

Reads the run's config (WORKDIR/config.json, written by `starjax.quiet_star.train`) and its latest
(or `--step`) Quiet-STaR checkpoint. For each prompt it prints the completion, then the same
completion with the thought read before each token in [[double brackets]] (dimmed on a terminal),
and the mean mixing weight. `--json=PATH` also writes every token, thought and weight (`-`: print
the JSON instead of the text). Prompts take C-style escapes (`\n`) as typed on a shell.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

THOUGHT_OPEN, THOUGHT_CLOSE = "[[", "]]"
_DIM, _RESET = "\x1b[2m", "\x1b[0m"


def load_run(workdir: str | Path, step: int | None = None) -> tuple[Any, Any, int]:
  """(train.Setup, Quiet-STaR params, step) from a training run's directory.

  Raises:
    FileNotFoundError: no config.json or no Quiet-STaR checkpoint in `workdir`.
    starjax.configs.ConfigError: the stored config is not valid.
  """
  from starjax.quiet_star import train  # pylint: disable=g-import-not-at-top
  from starjax.train import checkpoint, optim  # pylint: disable=g-import-not-at-top

  workdir = Path(workdir)
  config_path = workdir / "config.json"
  if not config_path.is_file():
    raise FileNotFoundError(f"{config_path} not found: --workdir must be a Quiet-STaR training "
                            "run (python -m starjax.quiet_star.train --workdir=...).")
  run = train.parse_config(json.loads(config_path.read_text()))
  s = train.setup(run)
  tx = optim.make_optimizer(run.optimizer, run.train.steps)
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", save_every=run.train.ckpt_every,
                                 keep=run.train.keep_ckpts, async_save=False)
  try:
    if ckpt.latest_step() is None:
      raise FileNotFoundError(f"No Quiet-STaR checkpoint in {workdir / 'checkpoints'} (has the "
                              "run finished its warm-up?).")
    state, _ = ckpt.restore(train.abstract_state(s.cfg, s.model_cfg, tx, s.mesh), step=step)
  finally:
    ckpt.close()
  return s, state.params, int(state.step)


def _piece(tok: Any, ids: Sequence[int]) -> str:
  return tok.decode(list(ids), skip_special=False)


def escape_thought(text: str) -> str:
  """Control characters (newlines, ...) as Python escapes, so a thought stays on one line."""
  return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def format_completion(tok: Any, prompt: str, completion: Any, *, color: bool = False) -> str:
  """The completion, then the prompt + completion with each token's thought marked, then w."""
  lines = [f"text: {prompt}{completion.text}"]
  if completion.thoughts and completion.thoughts[0]:
    parts = [prompt]
    for ids, thought in zip(completion.tokens, completion.thought_texts):
      th = THOUGHT_OPEN + escape_thought(thought) + THOUGHT_CLOSE
      parts.append((_DIM + th + _RESET if color else th) + _piece(tok, [ids]))
    lines.append("with thoughts: " + "".join(parts))
    w = np.asarray(completion.mixing_weights or [0.0])
    lines.append(f"mixing weight: mean {w.mean():+.4f} min {w.min():+.4f} max {w.max():+.4f}")
  return "\n".join(lines)


def completion_record(tok: Any, prompt: str, completion: Any) -> dict[str, Any]:
  """JSON-ready fields of one completion."""
  return {"prompt": prompt, "text": completion.text, "tokens": completion.tokens,
          "token_texts": [_piece(tok, [i]) for i in completion.tokens],
          "thoughts": completion.thoughts, "thought_texts": completion.thought_texts,
          "mixing_weights": completion.mixing_weights, "logprob": completion.logprob,
          "finished": completion.finished}


def _unescape(text: str) -> str:
  """C-style escapes decoded; other characters (any script) kept as they are."""
  if "\\" not in text:
    return text
  return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m starjax.quiet_star.generate",
                              description="Thought-augmented generation from a Quiet-STaR run.")
  p.add_argument("--workdir", required=True, help="The Quiet-STaR training run's directory.")
  p.add_argument("--prompt", action="append", required=True,
                 help="A prompt (repeat for a batch); C-style escapes such as \\n are decoded.")
  p.add_argument("--max_new_tokens", type=int, default=32)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--greedy", action="store_true", help="Argmax text tokens (thoughts are still "
                 "sampled as the run's config says).")
  p.add_argument("--temperature", type=float, default=1.0, help="Text sampling temperature.")
  p.add_argument("--top_k", type=int, default=0)
  p.add_argument("--top_p", type=float, default=1.0)
  p.add_argument("--stop", action="append", default=[], help="Stop string (repeatable).")
  p.add_argument("--no_thoughts", action="store_true", help="Decode the base LM alone.")
  p.add_argument("--step", type=int, default=None, help="Checkpoint step (default: latest).")
  p.add_argument("--json", default=None, help="Also write the results as JSON here ('-': print "
                 "the JSON instead of the text).")
  p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                 help="Dim the thoughts (auto: when stdout is a terminal).")
  p.add_argument("--batch_size", type=int, default=16,
                 help="Prompts per device call (rounded up to a multiple of the run mesh's batch "
                 "shards, over which each call's rows are split).")
  args = p.parse_args(argv)
  args.prompt = [_unescape(x) for x in args.prompt]
  args.stop = [_unescape(x) for x in args.stop]
  if any(not x for x in args.prompt):
    p.error("--prompt must not be empty.")
  if args.max_new_tokens < 1:
    p.error(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}.")
  return args


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line; returns the exit status."""
  args = parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top

  from starjax import configs  # pylint: disable=g-import-not-at-top
  from starjax.quiet_star import inference  # pylint: disable=g-import-not-at-top
  from starjax.utils_io import atomic_write_json  # pylint: disable=g-import-not-at-top

  absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax's restore notices.
  try:
    s, params, step = load_run(args.workdir, args.step)
  except (configs.ConfigError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  t0 = time.perf_counter()
  try:
    results = inference.generate_text_with_thoughts(
        params, s.tok, args.prompt, s.cfg, s.model_cfg, max_new_tokens=args.max_new_tokens,
        greedy=args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        stop=args.stop, seed=args.seed, thoughts=not args.no_thoughts,
        batch_size=args.batch_size, mesh=s.mesh)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  seconds = time.perf_counter() - t0
  records = [completion_record(s.tok, p, c) for p, c in zip(args.prompt, results)]
  report = {"workdir": str(args.workdir), "step": step, "seed": args.seed,
            "thoughts": not args.no_thoughts, "thought_tokens": s.cfg.n_sampled,
            "max_new_tokens": args.max_new_tokens, "greedy": args.greedy,
            "temperature": args.temperature, "seconds": seconds, "results": records}
  if args.json == "-":
    print(json.dumps(report, indent=1))
    return 0
  if args.json:
    atomic_write_json(args.json, report)
  color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
  mode = "no thoughts" if args.no_thoughts else f"{s.cfg.n_sampled} thought tokens per token"
  print(f"# {args.workdir} step {step}, {mode}, {seconds:.1f} s (compilation included)")
  for i, (p, c) in enumerate(zip(args.prompt, results)):
    print(f"--- [{i}]")
    print(format_completion(s.tok, p, c, color=color))
  return 0


if __name__ == "__main__":
  sys.exit(main())
