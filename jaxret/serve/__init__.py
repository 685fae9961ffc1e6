"""Visual search as a service: the catalogue behind an HTTP API and a web page.

  python -m jaxret.serve --workdir RUN --uri catalog.db [--host 127.0.0.1 --port 8000]

  app       `create_app(catalog, settings)`: the FastAPI routes (/search, /items/{id}/image, /healthz, /)
  batcher   `Batcher`: concurrent requests batched on the device (up to N requests or T milliseconds)
  uploads   what a request may carry: photo bytes and pixels (decompression bombs refused), k, category
  page      the single-file search page

See docs/search.md ("Serving").
"""

from jaxret.serve.app import Settings
from jaxret.serve.app import create_app
from jaxret.serve.uploads import Limits

__all__ = ["Limits", "Settings", "create_app"]
