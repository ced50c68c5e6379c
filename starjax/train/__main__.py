"""Command line: `python -m starjax.train --config=experiments/pretrain_tiny.py --workdir=DIR`.

Any config field can be overridden: `--config.train.steps=200 --config.model.dtype=bfloat16`.
Unknown keys and wrong types are rejected before any work starts.
"""

from __future__ import annotations

import json
import logging

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from starjax import configs, parallel
from starjax.parallel import multihost
from starjax.train import loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
  # Orbax logs every save phase at INFO through absl; keep the console readable.
  absl_logging.set_verbosity(absl_logging.WARNING)
  parallel.initialize()  # Multi-host runtime when STARJAX_DISTRIBUTED=1; a no-op otherwise.
  try:
    result = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (configs.ConfigError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from e
  summary = {k: v for k, v in result.items() if k != "state"}
  if multihost.is_primary():
    print(json.dumps(summary, indent=1, sort_keys=True))


if __name__ == "__main__":
  app.run(main)
