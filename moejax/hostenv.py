"""Host-process malloc settings for XLA:CPU training, applied before the interpreter starts.

XLA:CPU allocates each executable's temporaries as one buffer per call (504 MB for the MoE train
step of `benchmarks/train_step.py`). glibc serves an allocation that large from a fresh `mmap`
(always, from a worker thread's arena) and returns it with `munmap` when the call ends, so every
step faults in, and the kernel zeroes, every page of it again: 123k minor faults and about
0.23 s of kernel time per step there, on a 660 ms step. With these glibc tunables

    glibc.malloc.arena_max=1          every thread allocates from the main heap,
    glibc.malloc.mmap_max=0           which grows with brk instead of mapping large blocks,
    glibc.malloc.trim_threshold=1TiB  and keeps what is freed for the next call

the buffer stays mapped between steps: no faults, 0.01 s of kernel time, and the MoE step takes
about 580-600 ms (`benchmarks/train_step.py`). The main job (`python -m moejax.train`) went
from 9,923 to 11,969 tokens/s. Costs: the process keeps its peak heap instead of handing it back
to the OS, as a caching device allocator does, and compiling is slower because the compiler's
threads share one arena (the main job's first step: 8.9 to 12.2 s).
Whether a call's temporary lands in memory an earlier call freed depends on when XLA's threads
free it, so this is likely, not certain: with one CPU device (the CLI's default) the benchmark's
steps take 0 faults, but a 64 MiB test program next to two busy processes still faulted all of
its temporary in on 1 run of 8, and with `--xla_force_host_platform_device_count=8` a repeated
call faulted its buffers in again (20,817 against 24,535 faults). `benchmarks/train_step.py`
reports the faults per step.

glibc reads tunables only when a process starts, so the training CLI (`python -m moejax.train`)
and the train-step benchmark start the interpreter again with them (`reexec_with_host_malloc`).
Set MOEJAX_HOST_MALLOC=0 to keep the process as started. Nothing is done off Linux/glibc, or
when GLIBC_TUNABLES already sets a glibc.malloc tunable or a MALLOC_* variable is set (the
user's own malloc settings win).

This module imports nothing heavy, so it can run before jax (or torch) is imported.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLES = (
    "glibc.malloc.arena_max=1",
    "glibc.malloc.mmap_max=0",
    f"glibc.malloc.trim_threshold={1 << 40}",
)
OPT_OUT = "MOEJAX_HOST_MALLOC"


def host_malloc_env(environ: dict[str, str] | None = None) -> dict[str, str] | None:
    """The environment to restart with (GLIBC_TUNABLES gaining `TUNABLES`), or None when nothing
    should change (see the module docstring for when)."""
    environ = dict(os.environ if environ is None else environ)
    tunables = environ.get("GLIBC_TUNABLES", "")
    if environ.get(OPT_OUT, "1") == "0" or "glibc.malloc." in tunables:
        return None
    if any(name.startswith("MALLOC_") for name in environ):
        return None
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    environ["GLIBC_TUNABLES"] = ":".join(([tunables] if tunables else []) + list(TUNABLES))
    return environ


def host_malloc_active() -> bool:
    """Whether this process started with `TUNABLES`."""
    return all(t in os.environ.get("GLIBC_TUNABLES", "") for t in TUNABLES)


def reexec_with_host_malloc() -> None:
    """Replace this process by the same command under `TUNABLES`, when they apply.

    Uses `sys.orig_argv` (the interpreter's own command line, `-m` and flags included), so
    `python -m moejax.train --flags` restarts as exactly that, with the same pid. Returns only
    when nothing is done.
    """
    env = host_malloc_env()
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
