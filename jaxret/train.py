"""Trains a retrieval embedder and evaluates Recall@K: `python -m jaxret.train --config CONFIG --workdir DIR`.

The command line only: flags, the multi-process start-up and `main`. The training itself is
`jaxret.trainer.train_and_evaluate(config, workdir)`, importable without defining any flag.
"""

import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from jaxret import checkpointing
from jaxret import detections
from jaxret import distributed
from jaxret import embedding
from jaxret import evaluation
from jaxret import input_pipeline
from jaxret import run_config
from jaxret import trainer
from jaxret import workdir
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
_EXTEND_TOTAL_STEPS = flags.DEFINE_bool(
    "extend_total_steps", False, "Resume a run with a larger --config.total_steps than it was started with (the "
    "learning-rate schedule is stretched to the new end); without it a changed total_steps is refused.")
_EVAL_ONLY = flags.DEFINE_bool(
    "eval_only", False, "Evaluate the latest checkpoint of --workdir under --config without training, e.g. "
    "with --config.model.embedding=label_leaky_eval (the capsule papers' protocol) for a run trained with "
    "embedding=label; the config may differ from the run's only in evaluation fields. Appends the result to "
    "WORKDIR/eval_only.jsonl.")
_DETECTIONS = flags.DEFINE_string(
    "detections", None, "A detections file (JSON of boxes with scores per image, jaxret/detections.py; "
    "docs/deepfashion.md): evaluation also searches with the detected garments of the query (and gallery) "
    "photos and logs DeepFashion2's metric on them as df2_detections/top@k.")


def initialize_distributed() -> None:
  """Starts JAX's multi-controller runtime from the flags (`distributed.initialize`)."""
  settings = (_COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  try:
    distributed.check_settings(*settings)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  distributed.initialize(*settings, heartbeat_timeout_seconds=_HEARTBEAT_TIMEOUT.value)


# Problems a user can fix: the message, not a traceback.
USER_ERRORS = (run_config.ConfigError, input_pipeline.DatasetNotPreparedError, workdir.WorkdirError,
               checkpointing.CheckpointError, trainer.NonFiniteError, embedding.RunError,
               input_pipeline.MissingFeatureError, detections.DetectionsFileError)


def _last_line(text: str) -> str:
  """The last line of an error text (ml_collections puts a whole traceback in its messages), without the
  exception's module path."""
  line = [l for l in str(text).strip().splitlines() if l.strip()][-1].strip()
  name, _, rest = line.partition(": ")
  return rest if rest and "." in name and " " not in name else line


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with config-file problems (an unknown field or config argument, a value of the
  wrong type) reported as one `error:` line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, run_config.ConfigError, OSError, KeyError, AttributeError, TypeError, ValueError) as e:
    where = str(e).splitlines()[0].split(": ")[0] + ": " if isinstance(e, flags.Error) else ""
    what = "no such field " if isinstance(e, (KeyError, AttributeError)) else ""
    sys.exit(f"error: {where}{what}{_last_line(e)}\nUsage: python -m jaxret.train --config CONFIG_FILE[:smoke] "
             "--workdir DIR [--config.FIELD=VALUE ...]; see --help.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax and TFDS log every step at INFO; --verbosity=0 shows it.
  config = _CONFIG.value
  try:
    config is None or config["seed"]  # ml_collections reports a config file it could not load only now.
  except OSError as e:
    raise SystemExit(f"error: could not load the config file: {_last_line(e)}") from None
  if config is None or _WORKDIR.value is None:
    raise app.UsageError("Both --config and --workdir are required, e.g.\n"
                         "  python -m jaxret.train --config configs/demo.py --workdir /tmp/jaxret_demo")
  initialize_distributed()
  try:
    if _EVAL_ONLY.value:
      result = evaluation.evaluate_run(config, _WORKDIR.value, detections=_DETECTIONS.value)
      if jax.process_index() == 0:
        recalls = {int(key[len("recall@"):]): value for key, value in result.items() if key.startswith("recall@")}
        print(evaluation.recall_table(recalls, f"{config.model.name} (embedding {config.model.embedding}, "
                                               f"step {result['step']}, evaluation only)"))
        for prefix in ("df2", "df2_detections"):
          accuracy = {key: v for key, v in result.items() if key.startswith(f"{prefix}/top@")}
          if accuracy:
            print(f"DeepFashion2 top-k accuracy ({'detections' if '_' in prefix else 'ground-truth boxes'}): "
                  + ", ".join(f"{key.split('/')[1]} {100 * v:.1f}" for key, v in accuracy.items()))
    else:
      train_and_evaluate(config, _WORKDIR.value, extend_total_steps=_EXTEND_TOTAL_STEPS.value,
                         detections=_DETECTIONS.value)
  except USER_ERRORS as e:
    raise SystemExit(f"error: {e}") from None
  except Exception as e:  # Any failure of a multi-process run: first say which process is gone, then the trace.
    if jax.process_count() > 1:
      distributed.report_peer_failure(e)
    raise


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
