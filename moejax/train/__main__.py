"""`python -m moejax.train`: see moejax.train.main.

Restarts once with glibc malloc tunables first (`moejax.hostenv`): otherwise XLA:CPU's
per-step temporaries are mapped, faulted in page by page and unmapped again on every step.
"""

from moejax.hostenv import reexec_with_host_malloc

if __name__ == "__main__":
    reexec_with_host_malloc()

    from moejax.train.main import run

    run()
