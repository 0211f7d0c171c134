"""The service registry's records: instances, how they are keyed and stored, and a live set.

Theory of operation
-------------------
An :class:`Instance` is one process offering a service: the service's name, an
id unique within the service, the ``host:port`` clients dial, its health, and a
little metadata. The registry stores it as one key in a leased key-value store
(:class:`~trio_heartbeat._kv.KeyValueStore`)::

    trio-heartbeat/services/<service>/<instance id>  ->  {"address": ..., "health": ..., "metadata": {...}}

so one prefix range lists a service and one prefix watch follows it. The
value is JSON (UTF-8, at most :data:`MAX_VALUE_BYTES`), readable with
``etcdctl get --prefix`` by anyone debugging a fleet.

:class:`LiveSet` is discovery's sans-IO half: it is reset from a range read
at a revision and then fed the watch's batches of changes, and it answers each
with the :data:`DiscoveryEvent` records that say what happened to whom, in
revision order. A value it cannot read (written by something else, or
damaged) is counted in :attr:`LiveSet.malformed` and treated as absent: one bad
key never hides the others, nor ends discovery.

>>> live = LiveSet("echo")
>>> value = Instance("echo", "a", "127.0.0.1:7400").encode()
>>> [added] = live.apply([Change(ChangeKind.PUT, instance_key("echo", "a"), value, 5)])
>>> added.instance.address, added.revision, live.revision
('127.0.0.1:7400', 5, 5)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, TypeAlias, final

from ._address import parse_endpoint
from ._frames import HealthStatus
from ._leases import Change, ChangeKind, Entry

__all__ = [
    "DEFAULT_REGISTRY_PREFIX",
    "MAX_NAME_LENGTH",
    "MAX_VALUE_BYTES",
    "DiscoveryEvent",
    "Instance",
    "InstanceAdded",
    "InstanceChanged",
    "InstanceRemoved",
    "LiveSet",
    "instance_key",
    "service_prefix",
]

#: Where the registry keeps its keys, in etcd or the embedded store.
DEFAULT_REGISTRY_PREFIX: Final = "trio-heartbeat/services/"
#: The longest service name or instance id, in characters.
MAX_NAME_LENGTH: Final = 128
#: The largest stored value (address, health and metadata as JSON), in bytes.
MAX_VALUE_BYTES: Final = 4096
#: The longest address, in characters.
_MAX_ADDRESS_LENGTH: Final = 300


def _check_name(what: str, name: object) -> None:
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, not {type(name).__name__}")
    if not 1 <= len(name) <= MAX_NAME_LENGTH:
        raise ValueError(f"{what} must be 1 to {MAX_NAME_LENGTH} characters, not {len(name)}")
    if "/" in name or not name.isprintable() or any(c.isspace() for c in name):
        raise ValueError(f"{what} must be printable, without '/' or spaces: {name!r}")


@final
@dataclass(frozen=True)
class Instance:
    """One process offering a service, as the registry lists it.

    >>> Instance("echo", "a", "127.0.0.1:7400", metadata={"zone": "b"}).metadata
    {'zone': 'b'}

    ``service`` and ``instance_id`` are 1 to 128 printable characters without
    ``/`` or spaces; ``address`` is what clients dial (``host:port``, an IPv6
    host in brackets, at most 300 characters); ``metadata`` maps strings to
    strings. :exc:`ValueError` (:exc:`TypeError` for a wrong type) for
    anything else, or when the encoded record would pass
    :data:`MAX_VALUE_BYTES`.
    """

    service: str
    instance_id: str
    address: str
    health: HealthStatus = HealthStatus.SERVING
    metadata: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        _check_name("service", self.service)
        _check_name("instance_id", self.instance_id)
        if not isinstance(self.address, str):
            raise TypeError(f"address must be a str, not {type(self.address).__name__}")
        if len(self.address) > _MAX_ADDRESS_LENGTH or not self.address.isprintable():
            raise ValueError(f"address must be at most {_MAX_ADDRESS_LENGTH} printable characters")
        parse_endpoint(self.address)  # clients dial it: host:port, or it is not an instance
        if not isinstance(self.health, HealthStatus):
            raise TypeError(f"health must be a HealthStatus, not {self.health!r}")
        if not isinstance(self.metadata, Mapping) or not all(
            isinstance(key, str) and isinstance(value, str) for key, value in self.metadata.items()
        ):
            raise TypeError("metadata must map str to str")
        object.__setattr__(self, "metadata", dict(self.metadata))  # a copy the caller cannot change
        size = len(self.encode())
        if size > MAX_VALUE_BYTES:
            raise ValueError(f"the instance's record is {size} bytes, over {MAX_VALUE_BYTES}")

    @property
    def key(self) -> str:
        """Its key in the store, under :data:`DEFAULT_REGISTRY_PREFIX`."""
        return instance_key(self.service, self.instance_id)

    def encode(self) -> bytes:
        """The stored value: address, health and metadata as compact JSON."""
        record = {"address": self.address, "health": self.health.name, "metadata": self.metadata}
        return json.dumps(record, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def decode(cls, service: str, instance_id: str, value: bytes) -> Instance:
        """The instance a stored value describes; :exc:`ValueError` if it is not one."""
        if len(value) > MAX_VALUE_BYTES:
            raise ValueError(f"a record of {len(value)} bytes, over {MAX_VALUE_BYTES}")
        try:
            record = json.loads(value)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise ValueError(f"not a JSON record: {exc}") from None
        if not isinstance(record, dict):
            raise ValueError("the record is not a JSON object")
        health = record.get("health")
        if not isinstance(health, str) or health not in HealthStatus.__members__:
            raise ValueError(f"unknown health {health!r}")
        try:
            return cls(
                service,
                instance_id,
                record.get("address"),  # type: ignore[arg-type]  # checked by the constructor
                HealthStatus[health],
                record.get("metadata", {}),
            )
        except TypeError as exc:
            raise ValueError(str(exc)) from None


def service_prefix(service: str, prefix: str = DEFAULT_REGISTRY_PREFIX) -> str:
    """The prefix under which every instance of ``service`` is kept."""
    _check_name("service", service)
    return f"{prefix}{service}/"


def instance_key(service: str, instance_id: str, prefix: str = DEFAULT_REGISTRY_PREFIX) -> str:
    """The key of one instance."""
    _check_name("instance_id", instance_id)
    return service_prefix(service, prefix) + instance_id


@final
@dataclass(frozen=True, slots=True)
class InstanceAdded:
    """An instance registered (or came back)."""

    instance: Instance
    revision: int


@final
@dataclass(frozen=True, slots=True)
class InstanceChanged:
    """A registered instance changed its health, address or metadata."""

    instance: Instance
    previous: Instance
    revision: int


@final
@dataclass(frozen=True, slots=True)
class InstanceRemoved:
    """An instance withdrew, or its lease ran out (it died or hung)."""

    instance: Instance
    revision: int


#: What discovery says happened to one instance.
DiscoveryEvent: TypeAlias = InstanceAdded | InstanceChanged | InstanceRemoved


@final
class LiveSet:
    """The live instances of one service, kept current from a range and a watch (sans-IO)."""

    __slots__ = ("_instances", "_prefix", "malformed", "revision", "service")

    def __init__(self, service: str, prefix: str = DEFAULT_REGISTRY_PREFIX) -> None:
        self.service = service
        self._prefix = service_prefix(service, prefix)
        self._instances: dict[str, Instance] = {}
        #: The revision the set is current at (0 before the first read).
        self.revision = 0
        #: How many values could not be read as instances (and were left out).
        self.malformed = 0

    def __repr__(self) -> str:
        return f"<LiveSet {self.service!r}: {len(self._instances)} at revision {self.revision}>"

    def __len__(self) -> int:
        return len(self._instances)

    @property
    def instances(self) -> dict[str, Instance]:
        """The live instances by id, in id order (a copy)."""
        return dict(sorted(self._instances.items()))

    def reset(self, entries: Iterable[Entry], revision: int) -> tuple[DiscoveryEvent, ...]:
        """Take a fresh range read at ``revision``: the events that turn the old set into it.

        The set is then current at ``revision``, even one older than
        :attr:`revision`: the store's history started again (etcd restored,
        or started afresh), and changes are numbered from there now.
        """
        fresh: dict[str, Instance] = {}
        for entry in entries:
            instance = self._read(entry.key, entry.value)
            if instance is not None:
                fresh[instance.instance_id] = instance
        events: list[DiscoveryEvent] = []
        for instance_id, old in sorted(self._instances.items()):
            if instance_id not in fresh:
                events.append(InstanceRemoved(old, revision))
        for instance_id, new in sorted(fresh.items()):
            old_or_none = self._instances.get(instance_id)
            if old_or_none is None:
                events.append(InstanceAdded(new, revision))
            elif old_or_none != new:
                events.append(InstanceChanged(new, old_or_none, revision))
        self._instances = fresh
        self.revision = revision
        return tuple(events)

    def apply(self, changes: Iterable[Change]) -> tuple[DiscoveryEvent, ...]:
        """Take a batch of watched changes, oldest first: what happened, in that order.

        A change before :attr:`revision` was already taken (a watch resumed
        from an older revision) and is skipped; one revision may hold several
        changes (a lease that ran out with several keys).
        """
        events: list[DiscoveryEvent] = []
        for change in changes:
            if change.revision < self.revision:
                continue
            self.revision = change.revision
            instance_id = self._instance_id(change.key)
            if instance_id is None:
                continue
            old = self._instances.get(instance_id)
            new = None
            if change.kind is ChangeKind.PUT:
                new = self._read(change.key, change.value)
            if new is None:
                if old is not None:
                    del self._instances[instance_id]
                    events.append(InstanceRemoved(old, change.revision))
            elif old is None:
                self._instances[instance_id] = new
                events.append(InstanceAdded(new, change.revision))
            elif old != new:
                self._instances[instance_id] = new
                events.append(InstanceChanged(new, old, change.revision))
        return tuple(events)

    def _instance_id(self, key: str) -> str | None:
        if not key.startswith(self._prefix):
            return None
        instance_id = key[len(self._prefix) :]
        return instance_id if instance_id and "/" not in instance_id else None

    def _read(self, key: str, value: bytes) -> Instance | None:
        instance_id = self._instance_id(key)
        if instance_id is None:
            return None
        try:
            return Instance.decode(self.service, instance_id, value)
        except ValueError:
            self.malformed += 1
            return None
