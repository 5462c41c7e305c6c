"""Test setup: 8 fake CPU devices for the sharding tests, float32 matmuls at full precision."""

import os
import shutil
import tempfile

# Must run before jax is imported anywhere: gives 8 host devices so sharding tests can build
# meshes such as (data=2, expert=4) on one CPU.
os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# The suite's programs are tiny and compile-bound: LLVM at -O0 halves their compile time
# (measured: 2 sharded train-step tests 51 s -> 22 s). Subprocesses inherit the flag.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same programs (the tiny config's train step in every CLI and resume
# test, the notebooks, the multi-process runs): a persistent XLA cache shared by this run's
# processes compiles each once (measured: test_dts's resume test 45 s -> 30 s from an empty
# cache). The process that starts the run (the xdist controller, or pytest without xdist) makes
# a fresh directory; xdist workers and test subprocesses inherit it through the environment, and
# it is removed at the end, so no run reads another's executables. JAX never caches programs
# with host callbacks (Pallas interpret mode).
_OWN_XLA_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_XLA_CACHE = tempfile.mkdtemp(prefix="moejax-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_XLA_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_unconfigure(config):
    if _OWN_XLA_CACHE is not None:
        shutil.rmtree(_OWN_XLA_CACHE, ignore_errors=True)
