"""The simulation engine: local training, sites, server, and the experiment runner."""
