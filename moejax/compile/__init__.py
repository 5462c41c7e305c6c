"""moejax.compile: deviceless ahead-of-time compilation for TPU and GPU targets.

`compile_report(config, "tpu-v5p-128")` compiles a config's train step for a target with no
accelerator present and reports per-device memory, a step-time estimate, collectives and the
kernels used; `python -m moejax.compile` prints it. The targets: `moejax.compile.targets`.
"""

from moejax.compile.report import Report, compile_report, format_report
from moejax.compile.targets import TARGET_KINDS, Target, parse_target, topology

__all__ = [
    "TARGET_KINDS",
    "Report",
    "Target",
    "compile_report",
    "format_report",
    "parse_target",
    "topology",
]
