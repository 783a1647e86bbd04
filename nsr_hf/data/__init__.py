"""The data layer: corpora split by document, the label transform and its bins, and activation datasets (columns,
generation, balancing, card, storage and the Hub). It imports only the base layer."""
