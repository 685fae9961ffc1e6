"""The error of the catalogue: a problem the user can fix, with what to do."""


class CatalogError(ValueError):
  """A problem the user can fix (no checkpoint, no collection, another model's collection); says how."""


class IncompatibleCollectionError(CatalogError):
  """The collection holds vectors of another model (fingerprint, dimension or metric): re-index or pick another.

  Attributes:
    made_by_workdir: the run that made the collection, as the collection records it (None if unknown).
  """

  def __init__(self, message: str, made_by_workdir: str | None = None):
    super().__init__(message)
    self.made_by_workdir = made_by_workdir
