"""moejax.sharding."""
