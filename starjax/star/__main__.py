"""`python -m starjax.star --config=experiments/star_arithmetic.py --workdir=runs/star_arithmetic`.

Runs or resumes a STaR experiment and prints the accuracy table. Kill it at any point and rerun
the same command: finished stages are reused.
"""

from __future__ import annotations

import logging

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from starjax import configs, parallel
from starjax.parallel import multihost
from starjax.star import experiment

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
  absl_logging.set_verbosity(absl_logging.WARNING)
  parallel.initialize()  # Multi-host runtime when STARJAX_DISTRIBUTED=1; a no-op otherwise.
  try:
    results = experiment.run_experiment(_CONFIG.value, _WORKDIR.value, progress=_PROGRESS.value)
  except (configs.ConfigError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from e
  if multihost.is_primary():
    print(experiment.format_table(results))
    print(f"\nwrote {_WORKDIR.value}/results.json and {_WORKDIR.value}/accuracy.png")


if __name__ == "__main__":
  app.run(main)
