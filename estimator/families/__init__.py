"""Model families. Importing this package registers every built-in family."""

from estimator.families import mlp, module, transformer  # noqa: F401  (registers the three families)
