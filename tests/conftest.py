"""Test-session settings, applied before any test imports JAX.

The trainer tests start many short `python -m jaxret.train` processes that compile the same programs; a
persistent compilation cache (shared by those processes through the environment) compiles each only once.
It changes no result: entries are keyed by the program, the JAX version and the flags.
"""

import os
import tempfile

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "jaxret-test-jit-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
