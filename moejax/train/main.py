"""Command line: `python -m moejax.train --config=configs/<name>.py --workdir=DIR [overrides]`.

With no flags it trains the tiny default (configs/tiny.py) on the embedded corpus (the Python
standard library's sources) into ./runs/tiny. Restarting with the same --workdir resumes from its
latest checkpoint. Any config field can be overridden: `--config.moe.num_experts=16`.
An invalid config value stops the run with a one-line message naming the field (exit code 2).
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

import moejax


def default_config_path() -> str:
    """configs/tiny.py: in the current directory, else the copy installed as moejax.configs."""
    candidates = [
        Path.cwd() / "configs" / "tiny.py",
        Path(moejax.__file__).resolve().parent / "configs" / "tiny.py",
        Path(moejax.__file__).resolve().parent.parent / "configs" / "tiny.py",
    ]
    for c in candidates:
        if c.is_file():
            return str(c)
    # Fall back to the first candidate; config_flags then reports the missing file.
    return str(candidates[0])


_CONFIG = config_flags.DEFINE_config_file(
    "config", default_config_path(), "Config file with get_config() (configs/<name>.py)."
)
_WORKDIR = flags.DEFINE_string(
    "workdir", "runs/tiny", "Run directory: checkpoints, metrics, plots (resumed if present)."
)


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        # Keep the terminal for the progress bar and the summary; --verbosity=0 shows INFO.
        absl_logging.set_verbosity(absl_logging.WARNING)
    from moejax.sharding import initialize_distributed
    from moejax.train.trainer import format_summary, train_and_evaluate

    # Before anything touches the devices: joins a multi-host run (TPU pod slice, SLURM, MPI,
    # JAX_COORDINATOR_ADDRESS); a no-op in a single-process run.
    initialize_distributed()
    try:
        summary = train_and_evaluate(_CONFIG.value, _WORKDIR.value, progress=True)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


def run() -> None:
    app.run(main)
