"""Torch-side measurement of real training steps (import explicitly; nothing here is imported eagerly)."""
