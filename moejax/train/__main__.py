"""`python -m moejax.train`: see moejax.train.main."""

from moejax.train.main import run

if __name__ == "__main__":
    run()
