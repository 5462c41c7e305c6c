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
    import json, sys
    from moejax import hostenv
    hostenv.reexec_with_host_malloc()
    print(json.dumps([hostenv.host_malloc_active(), sys.argv[1:]]))
    """
)


def _run_child(env):
    """(tunables active, argv) in a child running _CHILD."""
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, "--flag=1", "x"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_glibc
def test_restart_keeps_the_command():
    """The child restarts itself under the tunables with its own arguments, and only once (the
    restarted process sees them set); with the opt-out it does not restart.

    What the tunables do to page faults is measured, not asserted: whether a call's temporary
    lands in memory a previous call freed depends on when XLA's threads free it, and under
    load a run sometimes faults all of it in anyway. `benchmarks/train_step.py` reports the
    minor faults per step of every row."""
    env = _clean_env()
    assert _run_child(env) == [True, ["--flag=1", "x"]]
    assert _run_child(dict(env, **{hostenv.OPT_OUT: "0"})) == [False, ["--flag=1", "x"]]
