"""The evaluation layer: baselines and controls, the predictor's readouts, figures with bootstrap intervals, the causal
test, ``run_evaluate`` and the report. It imports the layers below it."""
