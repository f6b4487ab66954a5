"""Deployment: every hospital its own node over Flower's Deployment Engine.

The transport is Flower's (``flwr``, the ``fedcore[deploy]`` extra): a SuperLink
at the coordinator, one SuperNode per hospital, TLS and SuperNode
authentication. fedcore supplies the ServerApp (:mod:`fedcore.plugins.deploy.server`,
which drives the simulation's :class:`~fedcore.engine.simulation.FederatedRun`)
and the ClientApp (:mod:`fedcore.plugins.deploy.client`, which trains through the one
adapter :func:`fedcore.plugins.deploy.site.train_site_round`). See docs/deployment.md.
"""

from __future__ import annotations

from fedcore.errors import PluginError


def require_flwr() -> None:
    """Raise a one-line user error when flwr (the ``deploy`` extra) is not installed."""
    try:
        import flwr  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise PluginError(
            "deployment needs Flower (flwr), which is not installed",
            hint="pip install 'fedcore[deploy]' (or re-run install.sh)",
        ) from exc
