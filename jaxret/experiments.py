"""Experiment suites: several training runs, each in its own workdir, and one table of their results.

  python -m jaxret.experiments --suite configs/suites/capsnets_synthetic.py --workdir ~/runs/capsnets
  python -m jaxret.experiments --suite configs/suites/capsnets_inshop.py --workdir ~/runs/cin --print_commands
  python -m jaxret.experiments --suite configs/suites/capsnets_inshop.py --workdir ~/runs/cin --report_only

A suite is a Python file whose `get_suite(arg)` returns `{name: Run(...)}`: a config file with its argument
and overrides, the protocols to report it under, and the papers' numbers where known (`configs/suites/`).
Run from the repository root, as `python -m jaxret.train` is. Every run trains in `DIR/<name>` through its own
`python -m jaxret.train` process, so a crash of one run does not stop the others, and the commands are exactly
those that `--print_commands` prints (one line per run) for a cluster queue (a SLURM array, a TPU queue);
`--report_only` then makes the tables from the finished workdirs. A run whose final evaluation is in its
`metrics.jsonl` is skipped; a killed one resumes, because rerunning its command resumes (jaxret/workdir.py).
Then `DIR/results.md`, `DIR/results.csv` (one row per run, protocol and selection) and `DIR/results.png`
(Recall@K curves) are written, each to a temporary name and renamed.

Protocols (docs/experiments.md):
* "honest": no label of a query or gallery image is used to embed it.
* "leaky": the capsule papers' protocol, `model.embedding="label_leaky_eval"`: the true category masks the
  query and gallery embeddings. A run trained with another embedding is evaluated again from its last
  checkpoint with `python -m jaxret.train ... --eval_only --config.model.embedding=label_leaky_eval`; a run
  trained with `label_leaky_eval` is evaluated honestly with `embedding="label"` (its predicted category).

Model selection: the row "final" is the last step. When a run holds out a validation split
(`config.input.validation_products`, jaxret/validation.py), the row "best val" is the evaluation step with the
highest validation Recall@1 and the test numbers logged at that step. No step is ever chosen on the test split.
"""

import argparse
from collections.abc import Mapping, Sequence
import csv
import ctypes
import dataclasses
import fcntl
import importlib.util
import inspect
import io
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

import ml_collections

from jaxret import workdir as run_dir

PROTOCOLS = ("honest", "leaky")
LEAKY_EMBEDDING = "label_leaky_eval"
# How a run trained with the leaky embedding is evaluated honestly: the predicted category's capsule.
HONEST_EMBEDDING = "label"
KS = (1, 10, 20, 30, 40, 50)
RESULT_FILES = ("results.md", "results.csv", "results.png")
ATTEMPTS_FILE = "attempts.jsonl"  # In each run's workdir: one line when a command starts, one when it ends.
LOG_FILE = "train.log"  # In each run's workdir: the output of its commands.
LOCK_FILE = ".experiments.lock"
EVAL_ONLY_FILE = "eval_only.jsonl"  # jaxret.evaluation.EVAL_ONLY_FILE (not imported: it would import JAX).
COLUMNS = ("run", "method", "model", "loss", "data", "protocol", "selection", "step", "steps",
           *(f"recall@{k}" for k in KS), "map@r", "val_recall@1", "images_per_sec", "wall_time_s", "commit",
           "source")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class SuiteError(ValueError):
  """A suite that cannot run (a bad file, entry or config field); the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Published:
  """Recall@K that a paper reports for a run's method and data.

  Attributes:
    source: where the numbers come from (paper, table, repository), and what qualifies them.
    recall_percent: `{K: Recall@K in percent}`, only the K the paper gives.
    protocol: how the paper evaluated: "leaky" or "honest".
  """
  source: str
  recall_percent: Mapping[int, float]
  protocol: str = "leaky"


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of a suite.

  Attributes:
    config: the config file, relative to the repository root (where the suite runs) or absolute.
    method: the method's name in the table, e.g. "RCCapsNet" or "triplet, batch-all".
    arg: the config argument (`--config FILE:arg`), e.g. "smoke"; None for none.
    overrides: `{field: value}`, passed as `--config.field=value` (bool, int, float, str, or a tuple of numbers).
    protocols: which of `PROTOCOLS` to report (see the module docstring).
    published: the papers' numbers for this method and data, shown beside the run's.
  """
  config: str
  method: str
  arg: str | None = None
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  protocols: tuple[str, ...] = ("honest",)
  published: tuple[Published, ...] = ()


# ---------------------------------------------------------------------------------------------- the suite


def _load_module(path: str, what: str):
  if not os.path.isfile(path):
    raise SuiteError(f"{what} {path} does not exist (relative paths are taken from {os.getcwd()}; run from "
                     "the repository root).")
  spec = importlib.util.spec_from_file_location(f"_jaxret_{what.replace(' ', '_')}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except  (any error in a user's file is reported as one line)
    raise SuiteError(f"Could not load {what} {path}: {type(e).__name__}: {e}") from e
  return module


def _call_with_arg(function, arg: str | None, what: str):
  accepts_arg = bool(inspect.signature(function).parameters)
  if arg is not None and not accepts_arg:
    raise SuiteError(f"{what} takes no argument, but ':{arg}' was given.")
  return function(arg) if accepts_arg else function()


def split_spec(spec: str) -> tuple[str, str | None]:
  """`path.py:arg` -> (path.py, arg); `path.py` -> (path.py, None)."""
  path, colon, arg = spec.partition(".py:")
  return (path + ".py", arg or None) if colon else (spec, None)


def load_suite(spec: str) -> dict[str, Run]:
  """The runs of `--suite path.py[:arg]`, checked: names usable as folder names, known protocols."""
  path, arg = split_spec(spec)
  module = _load_module(path, "suite file")
  if not hasattr(module, "get_suite"):
    raise SuiteError(f"Suite file {path} has no get_suite(arg) function returning {{name: experiments.Run}}.")
  runs = _call_with_arg(module.get_suite, arg, f"get_suite of {path}")
  if not isinstance(runs, Mapping) or not runs or not all(isinstance(r, Run) for r in runs.values()):
    raise SuiteError(f"get_suite of {path} must return a non-empty {{name: jaxret.experiments.Run}} dict.")
  for name, run in runs.items():
    if not _NAME.match(name):
      raise SuiteError(f"Run name {name!r} of {path} is not usable as a folder name; use letters, digits, "
                       "'_', '-' and '.'.")
    unknown = [p for p in (*run.protocols, *(pub.protocol for pub in run.published)) if p not in PROTOCOLS]
    if unknown or not run.protocols:
      raise SuiteError(f"Run {name!r} of {path}: protocols must be some of {PROTOCOLS}, got {run.protocols}.")
  return dict(runs)


def format_value(value: Any) -> str:
  """An override value as `--config.field=VALUE` spells it (a tuple as `(1, 2)`, which ml_collections parses)."""
  if isinstance(value, bool) or value is None:
    return str(value)
  if isinstance(value, (int, float, str)):
    return repr(value) if isinstance(value, float) else str(value)
  if isinstance(value, tuple) and value and all(
      isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
    return "(" + ", ".join(format_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  raise SuiteError(f"Override value {value!r}: only bool, int, float, str and tuples of numbers are supported.")


def load_config(run: Run) -> ml_collections.ConfigDict:
  """The config `python -m jaxret.train` builds for this run (the file's `get_config(arg)`, then overrides)."""
  module = _load_module(run.config, "config file")
  config = _call_with_arg(module.get_config, run.arg, f"get_config of {run.config}")
  for field, value in run.overrides.items():
    format_value(value)
    *parents, leaf = field.split(".")
    node = config
    try:
      for parent in parents:
        node = node[parent]
      if leaf not in node:
        raise KeyError(leaf)
      node[leaf] = value
    except (KeyError, AttributeError, TypeError) as e:
      raise SuiteError(f"Override --config.{field}={format_value(value)} of {run.config}: "
                       f"{'no such field' if not isinstance(e, TypeError) else e}.") from None
  return config


def train_command(run: Run, workdir: str) -> list[str]:
  """The `python -m jaxret.train ...` command of the run, as a list of arguments."""
  config = run.config + (f":{run.arg}" if run.arg else "")
  return ["python", "-m", "jaxret.train", "--config", config, "--workdir", workdir,
          *(f"--config.{field}={format_value(value)}" for field, value in run.overrides.items())]


def own_protocol(config: Mapping[str, Any]) -> str:
  """The protocol of a run's own evaluation (metrics.jsonl)."""
  return "leaky" if config["model"].get("embedding") == LEAKY_EMBEDDING else "honest"


def protocol_embedding(protocol: str) -> str:
  """The `model.embedding` that evaluates a trained capsule network under `protocol`."""
  return LEAKY_EMBEDDING if protocol == "leaky" else HONEST_EMBEDDING


def eval_only_command(run: Run, workdir: str, protocol: str) -> list[str]:
  """The command that evaluates the run's last checkpoint under `protocol` (`--eval_only`)."""
  overrides = {**run.overrides, "model.embedding": protocol_embedding(protocol)}
  return [*train_command(dataclasses.replace(run, overrides=overrides), workdir), "--eval_only"]


def run_commands(run: Run, config: Mapping[str, Any], workdir: str) -> list[list[str]]:
  """Every command the run needs, in order: training, then one `--eval_only` per other protocol."""
  return [train_command(run, workdir)] + [eval_only_command(run, workdir, p) for p in run.protocols
                                          if p != own_protocol(config)]


# ---------------------------------------------------------------------------------- what a workdir holds


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """The JSON lines of a file ([] if none); a line cut short by a killed writer is skipped."""
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return rows


def final_evaluation(workdir: str, total_steps: int) -> dict[str, Any] | None:
  """The evaluation row of step `total_steps` in the run's metrics.jsonl, or None."""
  rows = [r for r in read_jsonl(os.path.join(workdir, run_dir.METRICS_FILE))
          if r.get("step") == total_steps and "recall@1" in r]
  return rows[-1] if rows else None


def eval_only_result(workdir: str, protocol: str, step: int) -> dict[str, Any] | None:
  """The last `--eval_only` result of `step` under `protocol`, or None."""
  rows = [r for r in read_jsonl(os.path.join(workdir, EVAL_ONLY_FILE))
          if r.get("step") == step and r.get("model.embedding") == protocol_embedding(protocol)]
  return rows[-1] if rows else None


def stored_config(workdir: str) -> dict[str, Any] | None:
  path = os.path.join(workdir, run_dir.CONFIG_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def missing_work(run: Run, config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """What the run still needs: "train" and/or protocols to evaluate; [] when it is finished.

  A workdir whose stored config differs from the suite's in a field that changes the run is not finished
  (its command then stops with the trainer's message listing the fields).
  """
  stored = stored_config(workdir)
  new = json.loads(config.to_json())
  if stored is None or run_dir.config_changes(stored, new)[0] or not final_evaluation(workdir, config.total_steps):
    return ["train"] + [p for p in run.protocols if p != own_protocol(new)]
  return [p for p in run.protocols
          if p != own_protocol(new) and eval_only_result(workdir, p, config.total_steps) is None]


# ------------------------------------------------------------------------------------------- running


def git_commit() -> str:
  """The commit of the jaxret checkout that runs the commands (`-dirty` with uncommitted changes)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    head = subprocess.run(["git", "-C", root, "rev-parse", "--short=10", "HEAD"], capture_output=True,
                          text=True, check=True, timeout=30).stdout.strip()
    status = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                            capture_output=True, text=True, check=True, timeout=30).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "unknown"
  return head + ("-dirty" if status else "")


def _append_line(path: str, row: Mapping[str, Any]) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(row) + "\n")


def _stop_with(parent_pid: int):
  """A `preexec_fn` that makes the child receive SIGTERM when the runner dies (Linux), even by SIGKILL: the
  trainer then saves its step and stops, instead of training on as an orphan beside the next runner."""
  if not sys.platform.startswith("linux"):
    return None
  prctl = ctypes.CDLL(None, use_errno=True).prctl  # Looked up before the fork.
  pr_set_pdeathsig = 1

  def preexec():
    prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:  # The runner died before the call above.
      os.kill(os.getpid(), signal.SIGTERM)

  return preexec


class Runner:
  """Runs the commands of a suite one at a time; SIGINT/SIGTERM stop the current one cleanly (it saves its
  step, see jaxret/checkpointing.py) and the suite after it."""

  def __init__(self, lock_fd: int, out=sys.stdout):
    self.lock_fd = lock_fd
    self.out = out
    self.child = None
    self.stop_signal = None
    self.commit = git_commit()

  def handle_signal(self, signal_number, frame):
    del frame
    first = self.stop_signal is None
    self.stop_signal = signal_number
    if self.child is not None and self.child.poll() is None:
      # SIGTERM lets the trainer save the current step; a second signal interrupts it at once.
      self.child.send_signal(signal.SIGTERM if first else signal.SIGINT)

  def execute(self, command: Sequence[str], workdir: str) -> int:
    """Runs `command` (its `python` replaced by this interpreter) with its output appended to the run's log."""
    os.makedirs(workdir, exist_ok=True)
    attempts = os.path.join(workdir, ATTEMPTS_FILE)
    _append_line(attempts, {"event": "start", "time": time.time(), "commit": self.commit,
                            "command": shlex.join(command)})
    start = time.monotonic()
    with open(os.path.join(workdir, LOG_FILE), "ab") as log:
      log.write(f"\n$ {shlex.join(command)}\n".encode())
      log.flush()
      self.child = subprocess.Popen(
          [sys.executable, *command[1:]], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
          env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True, pass_fds=(self.lock_fd,),
          preexec_fn=_stop_with(os.getpid()))
      returncode = self.child.wait()
      self.child = None
    _append_line(attempts, {"event": "end", "time": time.time(), "seconds": time.monotonic() - start,
                            "returncode": returncode})
    return returncode


def _error_lines(workdir: str) -> str:
  """What the last command printed last: from its last `error:` line, else its last 3 lines."""
  path = os.path.join(workdir, LOG_FILE)
  if not os.path.exists(path):
    return ""
  with open(path, errors="replace") as f:
    last_command = f.read().split("\n$ ")[-1]
  # Progress bars redraw one line with carriage returns: keep what each line showed last.
  lines = [l.split("\r")[-1].rstrip() for l in last_command.split("\n")[1:]]
  lines = [l for l in lines if l.strip()]
  starts = [i for i, line in enumerate(lines) if line.startswith("error:")]
  return "\n    ".join(lines[starts[-1]:] if starts else lines[-3:])


@dataclasses.dataclass
class _Lock:
  fd: int


def acquire_lock(directory: str, out) -> _Lock:
  """Holds `DIR/.experiments.lock` (the commands inherit it): one runner per suite directory at a time."""
  fd = os.open(os.path.join(directory, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    print(f"{directory} is in use by another jaxret.experiments (or by a command of one that was stopped and "
          "is saving its checkpoint); waiting for it to finish...", file=out, flush=True)
    fcntl.flock(fd, fcntl.LOCK_EX)
  return _Lock(fd)


# ------------------------------------------------------------------------------------------- results


def loss_label(config: Mapping[str, Any]) -> str:
  """`config.loss.name` with each term's mining (or adaptive margins), e.g. "triplet (batch_all)"."""
  terms = []
  for name in str(config["loss"]["name"]).split("+"):
    section = config["loss"].get(name.strip(), {}) or {}
    detail = section.get("mining") or ("adaptive" if section.get("adaptive_margin") else "")
    terms.append(f"{name.strip()} ({detail})" if detail else name.strip())
  return " + ".join(terms)


def _attempt_summary(workdir: str) -> tuple[float | None, bool, str]:
  """(seconds of the attempts that ended, whether an attempt's end is unknown, the commits used)."""
  rows = read_jsonl(os.path.join(workdir, ATTEMPTS_FILE))
  starts = [r for r in rows if r.get("event") == "start"]
  ends = [r for r in rows if r.get("event") == "end"]
  commits = list(dict.fromkeys(r.get("commit", "unknown") for r in starts))
  seconds = sum(r.get("seconds", 0.0) for r in ends) if ends else None
  return seconds, len(starts) > len(ends), " + ".join(commits)


def run_rows(name: str, run: Run, workdir: str) -> list[dict[str, Any]]:
  """The result rows of one finished run: per protocol, "final" and (with a validation split) "best val"."""
  config = stored_config(workdir)
  total_steps = config["total_steps"]
  rows = read_jsonl(os.path.join(workdir, run_dir.METRICS_FILE))
  speeds = [r["images_per_sec"] for r in rows if r.get("images_per_sec") is not None]
  seconds, incomplete, commits = _attempt_summary(workdir)
  common = {"run": name, "method": run.method, "model": config["model"]["name"], "loss": loss_label(config),
            "data": config["input"]["dataset"], "steps": total_steps,
            "images_per_sec": statistics.median(speeds) if speeds else None, "wall_time_s": seconds,
            "wall_time_incomplete": incomplete, "commit": commits, "source": "jaxret"}
  evaluations = [r for r in rows if "recall@1" in r]
  result = []
  for protocol in run.protocols:
    if protocol == own_protocol(config):
      final = final_evaluation(workdir, total_steps)
      picked = [("final", final)]
      validated = [r for r in evaluations if r.get("val/recall@1") is not None]
      if validated:  # The first of the steps with the best validation Recall@1.
        picked.append(("best val", max(validated, key=lambda r: (r["val/recall@1"], -r["step"]))))
    else:
      picked = [("final", eval_only_result(workdir, protocol, total_steps))]
    for selection, row in picked:
      if row is None:
        continue
      result.append({**common, "protocol": protocol, "selection": selection, "step": row["step"],
                     **{f"recall@{k}": row.get(f"recall@{k}") for k in KS}, "map@r": row.get("map@r"),
                     "val_recall@1": row.get("val/recall@1")})
  return result


def published_rows(name: str, run: Run, config: Mapping[str, Any]) -> list[dict[str, Any]]:
  return [{"run": name, "method": run.method, "model": config["model"]["name"], "loss": loss_label(config),
           "data": config["input"]["dataset"], "protocol": pub.protocol, "selection": "published",
           **{f"recall@{k}": (pub.recall_percent[k] / 100 if k in pub.recall_percent else None) for k in KS},
           "source": pub.source} for pub in run.published]


def _percent(value: float | None) -> str:
  return "" if value is None else f"{100 * value:.1f}"


def _minutes(seconds: float | None, incomplete: bool) -> str:
  if seconds is None:
    return ""
  return f"{seconds / 60:.1f}" + ("+" if incomplete else "")


def write_atomically(path: str, text: str) -> None:
  with open(path + ".tmp", "w", newline="") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def results_csv(rows: Sequence[Mapping[str, Any]]) -> str:
  """One line per row, recalls and mAP@R as fractions in [0, 1], empty cells for what is not known."""
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
  writer.writeheader()
  for row in rows:
    writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in COLUMNS})
  return buffer.getvalue()


def results_markdown(rows: Sequence[Mapping[str, Any]], *, title: str, command: str,
                     unfinished: Mapping[str, str]) -> str:
  """The table in percent, the papers' numbers beside the runs, their sources as numbered notes."""
  sources = list(dict.fromkeys(r["source"] for r in rows if r["selection"] == "published"))
  header = ["Run", "Method", "Model", "Loss", "Data", "Protocol", "Selected", "Step",
            *(f"R@{k}" for k in KS), "mAP@R", "val R@1", "images/s", "wall min", "commit"]
  lines = [f"# {title}", "", f"`{command}`", "",
           "Recall@K and mAP@R in percent on the test query/gallery split. Protocol \"honest\": no label of a "
           "query or gallery image is used; \"leaky\": the true category masks the embeddings (the capsule "
           "papers' protocol). Selected \"final\": the last step; \"best val\": the step with the best "
           "validation R@1 (never a step chosen on the test split); \"paper [n]\": published numbers.", "",
           "| " + " | ".join(header) + " |", "|" + "---|" * 8 + "---:|" * (len(header) - 9) + "---|"]
  for row in rows:
    published = row["selection"] == "published"
    selected = f"paper [{sources.index(row['source']) + 1}]" if published else row["selection"]
    cells = [row["run"], row["method"], row["model"], row["loss"], row["data"], row["protocol"], selected,
             "" if published else str(row["step"]), *(_percent(row.get(f"recall@{k}")) for k in KS),
             _percent(row.get("map@r")), _percent(row.get("val_recall@1")),
             "" if row.get("images_per_sec") is None else f"{row['images_per_sec']:.0f}",
             _minutes(row.get("wall_time_s"), row.get("wall_time_incomplete", False)),
             "" if published else f"`{row['commit']}`"]
    lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
  if sources:
    lines += ["", *(f"[{i}] {source}" for i, source in enumerate(sources, start=1))]
  if unfinished:
    lines += ["", "Not finished:", *(f"- {name}: {why}" for name, why in unfinished.items())]
  lines.append("")
  return "\n".join(lines)


def plot_recall_curves(rows: Sequence[Mapping[str, Any]], path: str, title: str) -> None:
  """Recall@K against K for every "final" and published row: solid honest, dashed leaky, dotted papers."""
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  from jaxret import pictures  # pylint: disable=g-import-not-at-top  (matplotlib only when plotting)
  fig, ax = plt.subplots(figsize=(10, 5.5))
  runs = list(dict.fromkeys(row["run"] for row in rows))
  palette = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
  for row in rows:
    if row["selection"] not in ("final", "published"):
      continue
    points = [(k, 100 * row[f"recall@{k}"]) for k in KS if row.get(f"recall@{k}") is not None]
    if not points:
      continue
    colour = palette(runs.index(row["run"]) % palette.N)
    published = row["selection"] == "published"
    style = ":" if published else ("--" if row["protocol"] == "leaky" else "-")
    label = f"{row['run']} ({row['protocol']}{', paper' if published else ''})"
    ax.plot(*zip(*points), linestyle=style, marker="x" if published else "o", markersize=4, color=colour,
            label=label)
  ax.set(xlabel="K", ylabel="Recall@K (%)", title=title, ylim=(0, 100), xticks=KS)
  ax.grid(alpha=0.3)
  if ax.lines:
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7)
  fig.tight_layout()
  pictures.save_figure(fig, path)


def write_results(directory: str, suite: Mapping[str, Run], configs: Mapping[str, ml_collections.ConfigDict],
                  unfinished: Mapping[str, str], *, title: str, command: str) -> list[dict[str, Any]]:
  """Writes results.md, results.csv and results.png of the finished runs; returns the rows."""
  rows = []
  for name, run in suite.items():
    if name not in unfinished:
      rows += run_rows(name, run, os.path.join(directory, name))
    rows += published_rows(name, run, json.loads(configs[name].to_json()))
  write_atomically(os.path.join(directory, "results.csv"), results_csv(rows))
  write_atomically(os.path.join(directory, "results.md"),
                   results_markdown(rows, title=title, command=command, unfinished=unfinished))
  plot_recall_curves(rows, os.path.join(directory, "results.png"), title)
  return rows


# ---------------------------------------------------------------------------------------------- main


def pending_commands(run: Run, config: ml_collections.ConfigDict, workdir: str) -> list[list[str]]:
  """The commands of `run_commands` that the run still needs (none when it is finished)."""
  todo = missing_work(run, config, workdir)
  return ([train_command(run, workdir)] if "train" in todo else []) + [
      eval_only_command(run, workdir, protocol) for protocol in todo if protocol != "train"]


def run_suite(suite_spec: str, directory: str, *, print_commands: bool = False, report_only: bool = False,
              out=sys.stdout) -> int:
  """Runs (or prints, or only reports) a suite; returns the exit status (0: every run finished)."""
  suite = load_suite(suite_spec)
  configs = {name: load_config(run) for name, run in suite.items()}
  if print_commands:
    for name, run in suite.items():
      commands = run_commands(run, json.loads(configs[name].to_json()), os.path.join(directory, name))
      print(" && ".join(shlex.join(c) for c in commands), file=out)
    return 0
  directory = os.path.expanduser(directory)
  run_dir.check_writable(directory)
  lock = acquire_lock(directory, out)
  runner = Runner(lock.fd, out)
  previous = {s: signal.signal(s, runner.handle_signal) for s in (signal.SIGINT, signal.SIGTERM)}
  unfinished = {}
  try:
    for number, (name, run) in enumerate(suite.items(), start=1):
      workdir = os.path.join(directory, name)
      prefix = f"[{number}/{len(suite)}] {name}:"
      commands = pending_commands(run, configs[name], workdir)
      if not commands:
        print(f"{prefix} finished before; skipped.", file=out, flush=True)
        continue
      if report_only or runner.stop_signal is not None:
        unfinished[name] = "not finished" if report_only else "not run (the suite was stopped)"
        continue
      for command in commands:
        what = "evaluating" if "--eval_only" in command else "training"
        print(f"{prefix} {what} (log: {os.path.join(workdir, LOG_FILE)})", file=out, flush=True)
        returncode = runner.execute(command, workdir)
        if returncode != 0:
          if runner.stop_signal is not None:
            unfinished[name] = (f"stopped by {signal.Signals(runner.stop_signal).name} (rerun the suite to "
                                "resume it)")
          else:
            unfinished[name] = (f"failed (exit status {returncode}): "
                                f"{_error_lines(workdir) or 'see ' + os.path.join(workdir, LOG_FILE)}")
          print(f"{prefix} {unfinished[name]}", file=out, flush=True)
          break
      else:
        left = missing_work(run, configs[name], workdir)
        if left:
          unfinished[name] = f"its commands ended without {', '.join(left)}; see {os.path.join(workdir, LOG_FILE)}"
          print(f"{prefix} {unfinished[name]}", file=out, flush=True)
        else:
          final = final_evaluation(workdir, configs[name].total_steps)
          print(f"{prefix} done: R@1 {_percent(final['recall@1'])}%", file=out, flush=True)
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  command = f"python -m jaxret.experiments --suite {suite_spec} --workdir {directory}"
  write_results(directory, suite, configs, unfinished, title=f"Suite {suite_spec}", command=command)
  print(f"Results: {', '.join(os.path.join(directory, f) for f in RESULT_FILES)}", file=out, flush=True)
  if runner.stop_signal is not None:
    return 128 + runner.stop_signal
  return 1 if unfinished else 0


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m jaxret.experiments", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--suite", required=True, help="suite file, e.g. configs/suites/capsnets_synthetic.py "
                      "(':smoke' after it for the suite's smoke version)")
  parser.add_argument("--workdir", required=True, help="the suite's folder: one workdir per run, and results")
  parser.add_argument("--print_commands", action="store_true",
                      help="print one command line per run (for a cluster queue) instead of running them")
  parser.add_argument("--report_only", action="store_true",
                      help="run nothing: write the results of the runs that are finished")
  args = parser.parse_args(argv)
  try:
    return run_suite(args.suite, args.workdir, print_commands=args.print_commands, report_only=args.report_only)
  except (SuiteError, run_dir.WorkdirError) as e:  # Problems the user can fix: one line, no traceback.
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  # Suite files build `jaxret.experiments.Run`s: run that module's `main`, not this `__main__` copy's.
  from jaxret import experiments  # pylint: disable=g-import-not-at-top,import-self
  sys.exit(experiments.main())
