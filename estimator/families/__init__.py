"""Model families. Importing this package registers every built-in family."""

from estimator.families import mlp  # noqa: F401  (registers "mlp")
