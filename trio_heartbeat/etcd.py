"""The service registry's etcd backend (needs the ``etcd`` extra: httpx).

``pip install 'trio-heartbeat[etcd]'``, then::

    from trio_heartbeat.etcd import EtcdStore, open_etcd_store

A module of its own so that ``import trio_heartbeat`` never imports httpx.
:func:`open_etcd_store` talks to etcd 3.4 or newer through the JSON gateway
on its client port; see :class:`EtcdStore` for the operations, and the
module ``trio_heartbeat._etcd`` for the time bounds and errors.
"""

from __future__ import annotations

from ._etcd import EtcdStore as EtcdStore
from ._etcd import open_etcd_store as open_etcd_store

__all__ = ["EtcdStore", "open_etcd_store"]
