"""Test kit for code built on trio-heartbeat, or on any Trio stream.

Fault injection that runs in virtual time: :func:`faulty_stream_pair` (two
in-memory streams), :func:`open_faulty_stream` (wrap any
:class:`trio.abc.Stream`) and :class:`FaultProxy` (real TCP on loopback), all
driven by the same :class:`Faults` controls. See docs/testing.md.
"""

from __future__ import annotations

from ._faults import Direction as Direction
from ._faults import Faults as Faults
from ._faults import FaultStatistics as FaultStatistics
from ._faults import LinkFaults as LinkFaults
from ._faults import LinkStatistics as LinkStatistics
from ._faults import Side as Side
from ._network import Fleet as Fleet
from ._network import HostState as HostState
from ._network import MemoryHost as MemoryHost
from ._network import MemoryNetwork as MemoryNetwork
from ._network import StreamHandler as StreamHandler
from ._network import open_memory_network as open_memory_network
from ._network import run_clients as run_clients
from ._network import run_server_and_clients as run_server_and_clients
from ._proxy import FaultProxy as FaultProxy
from ._proxy import ProxyConnection as ProxyConnection
from ._proxy import ProxyStatistics as ProxyStatistics
from ._streams import FaultyHalfCloseableStream as FaultyHalfCloseableStream
from ._streams import FaultyStream as FaultyStream
from ._streams import faulty_stream_pair as faulty_stream_pair
from ._wire import DEFAULT_BUFFER_SIZE as DEFAULT_BUFFER_SIZE
from ._wrap import open_faulty_stream as open_faulty_stream

# One entry per public name, grouped by module; add new modules' names below.
__all__ = [
    # _faults, _wire, _streams, _wrap
    "DEFAULT_BUFFER_SIZE",
    "Direction",
    "FaultStatistics",
    "Faults",
    "FaultyHalfCloseableStream",
    "FaultyStream",
    "LinkFaults",
    "LinkStatistics",
    "Side",
    "faulty_stream_pair",
    "open_faulty_stream",
    # _proxy
    "FaultProxy",
    "ProxyConnection",
    "ProxyStatistics",
    # _network
    "Fleet",
    "HostState",
    "MemoryHost",
    "MemoryNetwork",
    "StreamHandler",
    "open_memory_network",
    "run_clients",
    "run_server_and_clients",
]
