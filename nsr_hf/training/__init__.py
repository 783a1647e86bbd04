"""The training layer: ``TrainConfig`` (a ``TrainingArguments``), the collator, ``PredictorTrainer``, the unfreezing strategies and
the drift monitor. It imports the layers below it (base, data, scanner, modeling)."""
