"""QK-OV interference: per-sample gradients -> diagonal Fisher -> pairwise scores, within a memory budget."""
