"""Secure aggregation plugins (the server learns only the sum of updates)."""
