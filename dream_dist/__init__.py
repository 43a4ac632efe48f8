"""dream_dist."""
