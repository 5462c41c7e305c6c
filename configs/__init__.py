"""Config files, one get_config() each; installed with the package as moejax.configs."""
