"""Reference ledgers plugins."""
