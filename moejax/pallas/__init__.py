"""moejax.pallas."""
