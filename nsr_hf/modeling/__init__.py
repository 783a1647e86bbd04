"""The modeling layer: the ``ActivationPredictor`` (a ``PreTrainedModel``), its heads, and the closed-form ridge probe of the
representation a head reads. It imports the base and data layers."""
