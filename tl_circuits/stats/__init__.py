"""Statistics of interference maps: permutation tests, corrections, bootstrap intervals, the model-level test."""
