"""Reference attacks plugins."""
