"""Model families. Importing this package registers every built-in family."""

from estimator.families import mlp, transformer  # noqa: F401  (registers "mlp" and "transformer")
