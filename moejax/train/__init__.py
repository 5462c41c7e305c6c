"""moejax.train: train state, pure train/eval steps, data pipeline, checkpoints, the CLI.

`python -m moejax.train --config=configs/<name>.py --workdir=DIR` runs `train_and_evaluate`.
"""

from moejax.train.checkpoint import Checkpointer
from moejax.train.data import Corpus, load_corpus
from moejax.train.state import TrainState, create_train_state, make_optimizer
from moejax.train.step import eval_step, train_step
from moejax.train.trainer import NonFiniteError, train_and_evaluate, validate_config

__all__ = [
    "Checkpointer",
    "Corpus",
    "NonFiniteError",
    "TrainState",
    "create_train_state",
    "eval_step",
    "load_corpus",
    "make_optimizer",
    "train_and_evaluate",
    "train_step",
    "validate_config",
]
