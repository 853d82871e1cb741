"""QK/OV circuit freezing: options, references, hooks, the freeze API and the head sweep."""
