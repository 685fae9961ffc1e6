"""The error of the catalogue: a problem the user can fix, with what to do."""


class CatalogError(ValueError):
  """A problem the user can fix (no checkpoint, no collection, another model's collection); says how."""
