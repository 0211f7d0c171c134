"""HTTP probes for Kubernetes and load balancers (needs the ``health`` extra: h11).

``pip install 'trio-heartbeat[health]'``, then::

    from trio_heartbeat.probes import ProbeServer, serve_probes

A module of its own so that ``import trio_heartbeat`` never imports h11. See
docs/self-healing.md and :class:`ProbeServer` for what is served and the
limits that keep the probe port from costing the heartbeat traffic anything.
"""

from __future__ import annotations

from ._probes import ProbeServer as ProbeServer
from ._probes import ProbeStatistics as ProbeStatistics
from ._probes import serve_probes as serve_probes

__all__ = ["ProbeServer", "ProbeStatistics", "serve_probes"]
