"""``python -m lowbit.cli``: the same as the ``lowbit`` console script."""

from lowbit.cli.main import app

app(prog_name="lowbit")
