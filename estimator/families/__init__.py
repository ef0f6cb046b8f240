"""Model families. Importing this package registers every built-in family."""

from estimator.families import mlp, module, moe, transformer  # noqa: F401  (registers the four families)
