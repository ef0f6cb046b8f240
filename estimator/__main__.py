"""``python -m estimator``: the same CLI as the ``estimator`` command."""

from estimator.cli import main

main()
