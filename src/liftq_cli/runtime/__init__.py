"""Runtime of packed LiftQuant models: `LiftQuantLinear` and the transformers loading hook."""
