"""A workdir is one run: its stored config, what may change when it is resumed, and its metrics log.

Rerunning `python -m jaxret.train` on a workdir resumes the run stored there. A config that would change that
run (model, loss, data, image size, batch, optimizer, seed, schedule) is refused before anything is written,
listing each field old -> new; fields that only change what is logged or kept (logging, evaluation and
checkpoint intervals, pictures, threads) are accepted and noted. A longer `total_steps` is accepted only with
`--extend_total_steps`, since the learning-rate schedule depends on it.
"""

from collections.abc import Iterator, Mapping
import json
import math
import os
import tempfile
from typing import Any

import ml_collections

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"

# Fields that change what is logged, evaluated or kept, not the trained model: accepted on resume.
# Where the decoded training images live changes how fast batches come, not which: the three cache modes give
# the same batches (tests/test_input_pipeline.py).
HARMLESS_FIELDS = (
    "log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "data_dir", "input.num_threads",
    "evals.ks", "evals.metric", "evals.batch_size", "evals.num_pictures", "evals.rerank",
    "evals.preclassify_top_k", "evals.preclassify_gallery",
    "input.cache", "input.cache_dir", "input.cache_memory_fraction", "input.num_workers", "input.prefetch",
)

# Fields added to the config after runs were stored, with the value that reproduces those runs: a stored
# config without the field is compared as if it held that value.
ADDED_FIELDS = {
    "input.validation_products": 0,
    "input.sampler": "pk",
    "input.categories_per_batch": 2,
    "input.classes_per_anchor": 2,
    "input.cache_size": None,
    "input.crop_to_box": False,
    "model.num_categories": None,
    "model.num_attributes": None,
    "model.feature_relaxation": None,
    "model.relaxation_features": None,
    "model.relaxation_dropout": None,
    "model.level_stages": None,
    "model.level_dim": None,
    "model.num_learners": None,
    "model.split_stage": None,
    "model.attention_features": None,
    "model.learner_sizes": None,
    "input.box_margin": 0.1,
    "optim.schedule": "warmup_cosine",
    "optim.decay_per_epoch": 0.995,
    "optim.head_lr_multiplier": 1.0,
    "optim.head_only_steps": 0,
    "loss.htl.rebuild_every": 0,
    "evals.preclassify_top_k": 0,
    "evals.preclassify_gallery": "known",
}


class WorkdirError(ValueError):
  """The workdir cannot hold this run (another run is there, or it cannot be written); says what to do."""


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
  return flat


def _active_loss_sections(config: Mapping[str, Any]) -> set[str]:
  """The `loss.<name>` sections the run reads (those of the terms in `loss.name`)."""
  return {f"loss.{name.strip()}." for name in str(config["loss"]["name"]).split("+")}


def config_changes(stored: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[list[str], list[str]]:
  """What differs between a run's stored config and a new one, as `(run-changing, harmless)` lines.

  Each line is `field: old -> new`. Sections of losses that neither config uses are not compared, and a field
  that the stored config lacks (added by a newer jaxret) counts only when set to something other than None
  (for `ADDED_FIELDS`, other than the value that reproduces the stored run).
  """
  old_flat, new_flat = _flatten(stored), _flatten(new)
  old_flat = {**{k: v for k, v in ADDED_FIELDS.items() if k in new_flat}, **old_flat}
  sections = _active_loss_sections(stored) | _active_loss_sections(new)
  changing, harmless = [], []
  for field in sorted(set(old_flat) | set(new_flat)):
    if field.startswith("loss.") and field != "loss.name" and not any(field.startswith(s) for s in sections):
      continue
    missing = object()
    old, value = old_flat.get(field, missing), new_flat.get(field, missing)
    if old == value or (old is missing and value is None) or (value is missing and old is None):
      continue
    line = f"{field}: {'(absent)' if old is missing else repr(old)} -> {'(absent)' if value is missing else repr(value)}"
    (harmless if field in HARMLESS_FIELDS else changing).append(line)
  return changing, harmless


def check_resume(workdir: str, config: ml_collections.ConfigDict, *, extend_total_steps: bool) -> list[str]:
  """Refuses a config that would change the run stored in `workdir`; returns notes on accepted changes.

  Raises:
    WorkdirError: listing every run-changing field, old -> new, and what to do instead.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  with open(path) as f:
    stored = json.load(f)
  changing, harmless = config_changes(stored, json.loads(config.to_json()))
  total = [line for line in changing if line.startswith("total_steps:")]
  if total and extend_total_steps and config.total_steps > stored.get("total_steps", 0):
    changing.remove(total[0])
    harmless.append(total[0] + " (--extend_total_steps: the learning-rate schedule now ends there)")
  if changing:
    hint = ""
    if total and not extend_total_steps and config.total_steps > stored.get("total_steps", 0):
      hint = ("\nTo train this run for longer, rerun with --extend_total_steps (the learning-rate schedule is "
              "stretched to the new end).")
    raise WorkdirError(
        f"{workdir} holds a run with another config; resuming it with this one would mix two runs:\n  "
        + "\n  ".join(changing)
        + f"\nUse a new --workdir for the new config, or rerun with the stored one ({path}).{hint}")
  return harmless


def check_writable(workdir: str) -> None:
  """Makes `workdir` if needed and checks that files can be created in it; WorkdirError naming it if not."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f"--workdir {workdir} is a file, not a folder; choose another path.")
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_check_"):
      pass
  except OSError as e:
    raise WorkdirError(f"Cannot write to --workdir {workdir}: {e.strerror}. Choose a writable folder.") from None


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Stores the run's config (atomically)."""
  path = os.path.join(workdir, CONFIG_FILE)
  with open(path + ".tmp", "w") as f:
    f.write(config.to_json(indent=2))
  os.replace(path + ".tmp", path)


def _json_value(value: Any) -> Any:
  value = float(value)
  return value if math.isfinite(value) else None


class MetricsLog:
  """`metrics.jsonl`: one JSON object per line, each step at most once, always valid JSON.

  On resume, lines after the restored step are dropped; a run that starts from step 0 starts a new log.
  Non-finite values are written as null, and the line names them under `"nonfinite"`.
  """

  def __init__(self, workdir: str, resume_step: int, enabled: bool):
    self.path = os.path.join(workdir, METRICS_FILE)
    self.enabled = enabled
    self.rows = []
    if os.path.exists(self.path) and resume_step > 0:
      with open(self.path) as f:
        self.rows = [row for row in map(json.loads, filter(str.strip, f)) if row["step"] <= resume_step]
    if enabled:
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in self.rows)
      os.replace(tmp, self.path)

  def write(self, row: Mapping[str, Any]) -> None:
    line = {"step": int(row["step"])}
    line.update({k: _json_value(v) for k, v in row.items() if k not in ("step", "note")})
    nonfinite = sorted(k for k, v in line.items() if v is None)
    if nonfinite:
      line["nonfinite"] = nonfinite
    if "note" in row:
      line["note"] = str(row["note"])
    self.rows.append(line)
    if self.enabled:
      with open(self.path, "a") as f:
        f.write(json.dumps(line, allow_nan=False) + "\n")

  def evaluations(self) -> Iterator[dict[str, Any]]:
    return (row for row in self.rows if any(key.startswith("recall@") for key in row))
