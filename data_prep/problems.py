"""One error message for many problems found in a user's files (a download, an annotation or detections file):
every problem is collected first, so that one run shows all of them, and the message lists the first few."""

from collections.abc import Sequence

MAX_LISTED_PROBLEMS = 20


def format_problems(what: str, problems: Sequence[str], advice: str) -> str:
  """`what has N problems:`, the first `MAX_LISTED_PROBLEMS` indented, how many more, then `advice`."""
  noun = "problem" if len(problems) == 1 else "problems"
  lines = [f"{what} has {len(problems)} {noun}:"]
  lines += [f"  {p}" for p in problems[:MAX_LISTED_PROBLEMS]]
  if len(problems) > MAX_LISTED_PROBLEMS:
    lines.append(f"  ... and {len(problems) - MAX_LISTED_PROBLEMS} more.")
  lines.append(advice)
  return "\n".join(lines)
