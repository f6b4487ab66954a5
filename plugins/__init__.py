"""fedcore's reference plugins, registered through the ``fedcore`` entry-point group."""
