"""A user's own model and data for hpcprune (see examples/README.md).

Nothing here imports hpcprune except for the ``TaskData`` record the data function returns:
any function that builds an ``nn.Module`` can be a model, any function that returns a
``TaskData`` can be a data set.
"""
from .data import digits
from .models import cnn

__all__ = ["cnn", "digits"]
