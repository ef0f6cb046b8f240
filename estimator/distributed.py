"""Kept for imports written against it: the per-rank estimates live in ``estimator.parallel``."""

from estimator.parallel import (  # noqa: F401
    STRATEGIES,
    RankEstimate,
    RankGroup,
    ddp_bucket_bytes,
    model_state_bytes,
    per_rank_estimate,
    per_rank_estimates,
    rank_groups,
)
