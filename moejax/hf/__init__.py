"""moejax.hf."""
