"""hpcprune's Hydra configs. Importing this package (Hydra does, to read them) registers the typed
schema config.yaml names first in its defaults list (``hpcprune_schema``, see hpcprune/schema.py)."""
from .. import schema as _schema  # noqa: F401 - registers hpcprune_schema in Hydra's ConfigStore
