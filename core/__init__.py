"""fedcore: privacy-preserving federated learning across hospitals.

Plugins implement the hooks in :mod:`fedcore.hookspecs` with :data:`hookimpl`.
"""

from fedcore.hookspecs import hookimpl

__all__ = ["hookimpl", "__version__"]
__version__ = "0.1.0"
