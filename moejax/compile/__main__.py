"""`python -m moejax.compile --config=configs/<name>.py --target=tpu-v5p-128 [overrides]`.

Compiles the config's train step for the target without any accelerator (the `aot` extra:
libtpu, XLA's CUDA compiler) and prints the per-device report of `moejax.compile.report`.
Exit 0 when it fits, 1 when it does not (the shortfall in one line on stderr), 2 for a bad
flag, config value or target (one line, as `python -m moejax.train`).
"""

from __future__ import annotations

import functools
import os
import sys

import jax
from absl import app, flags
from absl import logging as absl_logging

from moejax.compile.report import compile_report, format_report
from moejax.compile.targets import TARGET_KINDS
from moejax.train.main import _define_flags, _parse_flags


def main(argv: list[str], *, config_flag, target_flag) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        report = compile_report(config_flag.value, target_flag.value)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    if not report.fits:
        print(f"does not fit: {report.shortfall}", file=sys.stderr)
        return 1
    return 0


def run() -> None:
    if not os.environ.get("JAX_PLATFORMS"):
        # Deviceless: this host's own devices are never used, and for GPU targets the CUDA
        # plugin must not look for a local CUDA install.
        jax.config.update("jax_platforms", "cpu")
    # The train CLI's --config handling (defaults, overrides, one-line exit-2 errors); its
    # --workdir flag is defined too and unused here.
    config_flag, _ = _define_flags(sys.argv)
    target_flag = flags.DEFINE_string(
        "target",
        None,
        f"Compile target: {' | '.join(k + '-N' for k in TARGET_KINDS)} (v5p: N TensorCores).",
    )
    app.run(
        functools.partial(main, config_flag=config_flag, target_flag=target_flag),
        flags_parser=_parse_flags,
    )


if __name__ == "__main__":
    run()
