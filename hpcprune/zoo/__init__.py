"""Built-in models and data sets. Users bring their own through Hydra ``_target_`` entries."""
