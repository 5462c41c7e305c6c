"""Command line: `python -m moejax.train --config=configs/<name>.py --workdir=DIR [overrides]`.

With no flags it trains the tiny default (configs/tiny.py) on the embedded corpus (the Python
standard library's sources) into ./runs/tiny. Restarting with the same --workdir resumes from its
latest checkpoint. Any config field can be overridden: `--config.moe.num_experts=16`.
An invalid config value, an unknown field or a missing config file stops the run with a one-line
message naming it (exit code 2).
"""

from __future__ import annotations

import functools
import re
import sys
from pathlib import Path
from typing import NoReturn

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


def _config_path(argv: list[str]) -> str:
    """The --config file named on the command line (without a `:args` suffix), or the default."""
    for i, arg in enumerate(argv[1:], 1):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1].split(":", 1)[0]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1].split(":", 1)[0]
    return default_config_path()


def _fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _unknown_field(e: Exception, argv: list[str]) -> NoReturn:
    # ml_collections reports "'stepz'\nDid you mean "steps" instead of "stepz"?".
    while e.args and isinstance(e.args[0], Exception):  # AttributeError(KeyError(...))
        e = e.args[0]
    text = str(e.args[0]) if e.args else str(e)
    key = re.search(r"'(\w+)'", text)
    hint = re.search(r'Did you mean "(\w+)"', text)
    name = key.group(1) if key else text.splitlines()[0]
    bad = [
        a.split("=", 1)[0] for a in argv if a.startswith("--config.") and name in a.split("=")[0]
    ]
    where = bad[0] if bad else f"--config.*.{name}"
    _fail(
        f"{where}: the config has no field {name!r}"
        + (f" (did you mean {hint.group(1)!r}?)" if hint else "")
    )


def _define_flags(argv: list[str]):
    """The --config and --workdir flags; with no --config the default is loaded here."""
    if not Path(_config_path(argv)).is_file():
        _fail(f"--config={_config_path(argv)}: no such config file")
    try:
        config = config_flags.DEFINE_config_file(
            "config", default_config_path(), "Config file with get_config() (configs/<name>.py)."
        )
    except (AttributeError, KeyError) as e:  # an override of a field the default lacks
        _unknown_field(e, argv)
    workdir = flags.DEFINE_string(
        "workdir", "runs/tiny", "Run directory: checkpoints, metrics, plots (resumed if present)."
    )
    return config, workdir


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, with every bad flag or override reported in one line, exit code 2."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        _unknown_field(e, argv)
    except flags.Error as e:
        _fail(str(e).splitlines()[0])


def main(argv: list[str], *, config_flag, workdir_flag) -> int:
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
        summary = train_and_evaluate(config_flag.value, workdir_flag.value, progress=True)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


def run() -> None:
    config_flag, workdir_flag = _define_flags(sys.argv)
    app.run(
        functools.partial(main, config_flag=config_flag, workdir_flag=workdir_flag),
        flags_parser=_parse_flags,
    )
