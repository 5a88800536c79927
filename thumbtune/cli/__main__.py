"""`python -m thumbtune.cli ...`: how `thumbtune up` starts its children."""

from thumbtune.cli.main import app

app()
