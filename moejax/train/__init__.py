"""moejax.train."""
