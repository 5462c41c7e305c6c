"""moejax.hostenv: when the training CLI restarts with glibc malloc tunables, and what they do."""

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from moejax import hostenv

GLIBC_LINUX = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
needs_glibc = pytest.mark.skipif(not GLIBC_LINUX, reason="glibc malloc tunables need Linux/glibc")


def _clean_env(**extra):
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "GLIBC_TUNABLES" and k != hostenv.OPT_OUT and not k.startswith("MALLOC_")
    }
    env.update(extra)
    return env


@needs_glibc
def test_env_gains_the_tunables_and_keeps_the_users_others():
    env = hostenv.host_malloc_env(_clean_env())
    assert env["GLIBC_TUNABLES"] == ":".join(hostenv.TUNABLES)
    env = hostenv.host_malloc_env(_clean_env(GLIBC_TUNABLES="glibc.rtld.nns=8"))
    assert env["GLIBC_TUNABLES"] == ":".join(("glibc.rtld.nns=8", *hostenv.TUNABLES))


@pytest.mark.parametrize(
    "extra",
    [
        {hostenv.OPT_OUT: "0"},
        {"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"},
        {"MALLOC_ARENA_MAX": "2"},
    ],
    ids=["opt_out", "own_malloc_tunable", "own_malloc_variable"],
)
def test_env_is_left_alone_when_the_user_decides(extra):
    assert hostenv.host_malloc_env(_clean_env(**extra)) is None


def test_env_is_left_alone_off_linux(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert hostenv.host_malloc_env(_clean_env()) is None


_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    from moejax import hostenv
    hostenv.reexec_with_host_malloc()
    import jax, jax.numpy as jnp
    # A 64 MiB intermediate between two matmuls: XLA:CPU's temporary buffer for the call.
    f = jax.jit(lambda a, b: (a @ b) @ b.T)
    a = jnp.ones((4096, 512)); b = jnp.ones((512, 4096))
    for _ in range(2):
        f(a, b).block_until_ready()
    faults = []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        f(a, b).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    faults = min(faults)
    print(json.dumps([hostenv.host_malloc_active(), faults, sys.argv[1:]]))
    """
)


def _run_child(env):
    """(tunables active, fewest minor faults of calls 3-5, argv) in a child running _CHILD."""
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, "--flag=1", "x"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_glibc
def test_restart_keeps_the_command_and_keeps_temporaries_mapped():
    """The restarted child has the tunables and its arguments, and a repeated call faults in
    a small part of what glibc's defaults fault in (all 16k pages of the 64 MiB temporary; 0
    to 2k under the tunables, seen here).
    One CPU device, as the training CLI has by default: with the suite's 8 host devices the
    repeated call faults in its buffers again under the tunables too (moejax.hostenv)."""
    env = _clean_env(JAX_PLATFORMS="cpu", XLA_FLAGS="")
    active, tuned_faults, argv = _run_child(env)
    assert active and argv == ["--flag=1", "x"]
    default_active, default_faults, _ = _run_child(
        _clean_env(JAX_PLATFORMS="cpu", **{hostenv.OPT_OUT: "0"})
    )
    assert not default_active
    assert default_faults > 8000 and tuned_faults * 4 < default_faults, (
        tuned_faults,
        default_faults,
    )
