"""``python -m estimator``: the same CLI as the ``estimator`` command."""

from estimator.cli import main

if __name__ == "__main__":  # guarded: verify --parallel spawns processes that re-import __main__
    main()
