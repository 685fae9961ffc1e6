"""Trains a retrieval embedder and evaluates Recall@K: `python -m jaxret.train --config CONFIG --workdir DIR`.

The command line only: flags, the multi-process start-up and `main`. The training itself is
`jaxret.trainer.train_and_evaluate(config, workdir)`, importable without defining any flag.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from jaxret import distributed
from jaxret import input_pipeline
from jaxret import run_config
from jaxret.trainer import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file, e.g. configs/demo.py.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and pictures.")
_COORDINATOR_ADDRESS = flags.DEFINE_string("coordinator_address", None,
                                           distributed.FLAGS_HELP["coordinator_address"])
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, distributed.FLAGS_HELP["num_processes"])
_PROCESS_ID = flags.DEFINE_integer("process_id", None, distributed.FLAGS_HELP["process_id"])
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer("heartbeat_timeout_seconds", 30,
                                          distributed.FLAGS_HELP["heartbeat_timeout_seconds"])


def initialize_distributed() -> None:
  """Starts JAX's multi-controller runtime from the flags (`distributed.initialize`)."""
  settings = (_COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  try:
    distributed.check_settings(*settings)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  distributed.initialize(*settings, heartbeat_timeout_seconds=_HEARTBEAT_TIMEOUT.value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax and TFDS log every step at INFO; --verbosity=0 shows it.
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError("Both --config and --workdir are required, e.g.\n"
                         "  python -m jaxret.train --config configs/demo.py --workdir /tmp/jaxret_demo")
  initialize_distributed()
  try:
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (run_config.ConfigError, input_pipeline.DatasetNotPreparedError) as e:
    # Problems a user can fix (bad config, missing dataset): the message, not a traceback.
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  app.run(main)
