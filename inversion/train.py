"""``python -m inversion.train CONFIG``: train the concepts of a config file, headless (``inversion.cli.run``)."""

from .cli.run import console

if __name__ == "__main__":
    console()
