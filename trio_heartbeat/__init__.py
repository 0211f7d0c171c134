"""trio-heartbeat: keep long-lived Trio connections honest.

THB/1 framing and heartbeats, failure detection, a server with a liveness
registry, and a reconnecting client, built on Trio's structured concurrency.
The sans-IO protocol core (:class:`HeartbeatProtocol` and the codec) imports
nothing from Trio and can drive any I/O layer.
"""

from __future__ import annotations

from ._adaptive import AdaptiveDetector as AdaptiveDetector
from ._backoff import DEFAULT_BACKOFF as DEFAULT_BACKOFF
from ._backoff import GRPC_BACKOFF as GRPC_BACKOFF
from ._backoff import GRPC_MIN_CONNECT_TIMEOUT as GRPC_MIN_CONNECT_TIMEOUT
from ._backoff import ConstantBackoff as ConstantBackoff
from ._backoff import DecorrelatedJitterBackoff as DecorrelatedJitterBackoff
from ._backoff import EqualJitterBackoff as EqualJitterBackoff
from ._backoff import ExponentialBackoff as ExponentialBackoff
from ._backoff import FullJitterBackoff as FullJitterBackoff
from ._breaker import BreakerConfig as BreakerConfig
from ._breaker import BreakerState as BreakerState
from ._breaker import BreakerStatistics as BreakerStatistics
from ._breaker import BreakerTransition as BreakerTransition
from ._breaker import CircuitBreaker as CircuitBreaker
from ._breaker import Permit as Permit
from ._breaker import WindowKind as WindowKind
from ._budget import BufferBudget as BufferBudget
from ._circuit import HEARTBEAT_BREAKER_CONFIG as HEARTBEAT_BREAKER_CONFIG
from ._circuit import Breaker as Breaker
from ._client import open_connection as open_connection
from ._config import Config as Config
from ._connection import Connection as Connection
from ._connection import EventListener as EventListener
from ._detectors import FailureDetector as FailureDetector
from ._detectors import FixedTimeout as FixedTimeout
from ._detectors import PhiAccrualDetector as PhiAccrualDetector
from ._discovery import Discovery as Discovery
from ._discovery import DiscoveryFresh as DiscoveryFresh
from ._discovery import DiscoveryNotice as DiscoveryNotice
from ._discovery import DiscoveryStale as DiscoveryStale
from ._discovery import open_discovery as open_discovery
from ._endpoints import Endpoint as Endpoint
from ._endpoints import EndpointSource as EndpointSource
from ._errors import BrokenConnection as BrokenConnection
from ._errors import CircuitOpen as CircuitOpen
from ._errors import ConnectionClosed as ConnectionClosed
from ._errors import ConnectionRejected as ConnectionRejected
from ._errors import Conviction as Conviction
from ._errors import HeartbeatError as HeartbeatError
from ._errors import HeartbeatTimeout as HeartbeatTimeout
from ._errors import LocalProtocolError as LocalProtocolError
from ._errors import ProtocolError as ProtocolError
from ._errors import ReconnectFailed as ReconnectFailed
from ._errors import RemoteProtocolError as RemoteProtocolError
from ._errors import StoreUnavailable as StoreUnavailable
from ._errors import SupervisorGaveUp as SupervisorGaveUp
from ._errors import UndeliveredMessages as UndeliveredMessages
from ._errors import UnknownEndpoint as UnknownEndpoint
from ._errors import WatchCompacted as WatchCompacted
from ._events import NEED_DATA as NEED_DATA
from ._events import ConnectionEnded as ConnectionEnded
from ._events import DataReceived as DataReceived
from ._events import Event as Event
from ._events import FrameCounters as FrameCounters
from ._events import HandshakeComplete as HandshakeComplete
from ._events import Liveness as Liveness
from ._events import PeerHealthChanged as PeerHealthChanged
from ._events import PeerRecovered as PeerRecovered
from ._events import PeerSuspected as PeerSuspected
from ._events import PingReceived as PingReceived
from ._events import PongReceived as PongReceived
from ._frames import Close as Close
from ._frames import CloseCode as CloseCode
from ._frames import Frame as Frame
from ._frames import FrameDecoder as FrameDecoder
from ._frames import FrameType as FrameType
from ._frames import HealthStatus as HealthStatus
from ._frames import Hello as Hello
from ._frames import Ping as Ping
from ._frames import Pong as Pong
from ._frames import Role as Role
from ._handshake import compute_auth as compute_auth
from ._health import Component as Component
from ._health import ComponentSnapshot as ComponentSnapshot
from ._health import HealthBoard as HealthBoard
from ._health_monitor import HealthComponent as HealthComponent
from ._health_monitor import HealthListener as HealthListener
from ._health_monitor import HealthMonitor as HealthMonitor
from ._health_monitor import HealthTarget as HealthTarget
from ._health_monitor import open_health_monitor as open_health_monitor
from ._instances import DEFAULT_REGISTRY_PREFIX as DEFAULT_REGISTRY_PREFIX
from ._instances import DiscoveryEvent as DiscoveryEvent
from ._instances import Instance as Instance
from ._instances import InstanceAdded as InstanceAdded
from ._instances import InstanceChanged as InstanceChanged
from ._instances import InstanceRemoved as InstanceRemoved
from ._instances import LiveSet as LiveSet
from ._keepalive import KeepaliveOptions as KeepaliveOptions
from ._keepalive import SupportsSockopt as SupportsSockopt
from ._keepalive import apply_keepalive as apply_keepalive
from ._keepalive import read_keepalive as read_keepalive
from ._kv import KeyValueStore as KeyValueStore
from ._leases import Change as Change
from ._leases import ChangeKind as ChangeKind
from ._leases import Entry as Entry
from ._leases import LeaseStore as LeaseStore
from ._liveness_breaker import LivenessBinding as LivenessBinding
from ._liveness_breaker import bind_breaker as bind_breaker
from ._local_health import LocalHealth as LocalHealth
from ._local_health import local_health as local_health
from ._memory_store import MemoryStore as MemoryStore
from ._memory_store import open_memory_store as open_memory_store
from ._options import ConnectionOptions as ConnectionOptions
from ._outliers import EjectionEvent as EjectionEvent
from ._outliers import OutlierEjection as OutlierEjection
from ._outliers import OutlierStatistics as OutlierStatistics
from ._outliers import ejection_cap as ejection_cap
from ._protocol import HeartbeatProtocol as HeartbeatProtocol
from ._publisher import publish_peers as publish_peers
from ._reconnect_events import AttemptFailed as AttemptFailed
from ._reconnect_events import AttemptStarted as AttemptStarted
from ._reconnect_events import BackingOff as BackingOff
from ._reconnect_events import Connected as Connected
from ._reconnect_events import Disconnected as Disconnected
from ._reconnect_events import Stopped as Stopped
from ._reconnect_events import SupervisorEvent as SupervisorEvent
from ._reconnect_events import SupervisorListener as SupervisorListener
from ._reconnect_events import SupervisorState as SupervisorState
from ._registration import Registration as Registration
from ._registration import RegistrationState as RegistrationState
from ._registration import open_registration as open_registration
from ._registry import Departure as Departure
from ._registry import LivenessRegistry as LivenessRegistry
from ._registry import PeerInfo as PeerInfo
from ._restart import DEFAULT_RESTART_BUDGET as DEFAULT_RESTART_BUDGET
from ._restart import ChildState as ChildState
from ._restart import Decision as Decision
from ._restart import ExitKind as ExitKind
from ._restart import RestartBudget as RestartBudget
from ._restart import RestartPlan as RestartPlan
from ._restart import RestartStatistics as RestartStatistics
from ._restart import RestartType as RestartType
from ._restart import Strategy as Strategy
from ._sdnotify import SystemdNotifier as SystemdNotifier
from ._server import Handler as Handler
from ._server import Server as Server
from ._server import ServerStatistics as ServerStatistics
from ._server import serve_tcp as serve_tcp
from ._service_events import ChildAbandoned as ChildAbandoned
from ._service_events import ChildExited as ChildExited
from ._service_events import ChildRestarting as ChildRestarting
from ._service_events import ChildStarted as ChildStarted
from ._service_events import ChildStopped as ChildStopped
from ._service_events import ServiceEvent as ServiceEvent
from ._service_events import ServiceListener as ServiceListener
from ._service_events import ServiceStatistics as ServiceStatistics
from ._service_events import SupervisorStopped as SupervisorStopped
from ._services import DEFAULT_SERVICE_BACKOFF as DEFAULT_SERVICE_BACKOFF
from ._services import CheckIn as CheckIn
from ._services import ChildSpec as ChildSpec
from ._services import ServiceSupervisor as ServiceSupervisor
from ._services import open_service_supervisor as open_service_supervisor
from ._silence import SilenceRule as SilenceRule
from ._state import State as State
from ._statistics import ConnectionStatistics as ConnectionStatistics
from ._stream_connection import open_stream_connection as open_stream_connection
from ._supervisor import DEFAULT_STOP_CODES as DEFAULT_STOP_CODES
from ._supervisor import Connector as Connector
from ._supervisor import ReconnectingClient as ReconnectingClient
from ._supervisor import open_reconnecting_client as open_reconnecting_client
from ._systemd import notify_systemd as notify_systemd

__all__ = [
    "AdaptiveDetector",
    "apply_keepalive",
    "AttemptFailed",
    "AttemptStarted",
    "BackingOff",
    "bind_breaker",
    "Breaker",
    "BreakerConfig",
    "BreakerState",
    "BreakerStatistics",
    "BreakerTransition",
    "BrokenConnection",
    "BufferBudget",
    "Change",
    "ChangeKind",
    "CheckIn",
    "ChildAbandoned",
    "ChildExited",
    "ChildRestarting",
    "ChildSpec",
    "ChildStarted",
    "ChildState",
    "ChildStopped",
    "CircuitBreaker",
    "CircuitOpen",
    "Close",
    "CloseCode",
    "Component",
    "ComponentSnapshot",
    "compute_auth",
    "Config",
    "Connected",
    "Connection",
    "ConnectionClosed",
    "ConnectionEnded",
    "ConnectionOptions",
    "ConnectionRejected",
    "ConnectionStatistics",
    "Connector",
    "ConstantBackoff",
    "Conviction",
    "DataReceived",
    "Decision",
    "DecorrelatedJitterBackoff",
    "DEFAULT_BACKOFF",
    "DEFAULT_REGISTRY_PREFIX",
    "DEFAULT_RESTART_BUDGET",
    "DEFAULT_SERVICE_BACKOFF",
    "DEFAULT_STOP_CODES",
    "Departure",
    "Disconnected",
    "Discovery",
    "DiscoveryEvent",
    "DiscoveryFresh",
    "DiscoveryNotice",
    "DiscoveryStale",
    "ejection_cap",
    "EjectionEvent",
    "Endpoint",
    "EndpointSource",
    "Entry",
    "EqualJitterBackoff",
    "Event",
    "EventListener",
    "ExitKind",
    "ExponentialBackoff",
    "FailureDetector",
    "FixedTimeout",
    "Frame",
    "FrameCounters",
    "FrameDecoder",
    "FrameType",
    "FullJitterBackoff",
    "GRPC_BACKOFF",
    "GRPC_MIN_CONNECT_TIMEOUT",
    "Handler",
    "HandshakeComplete",
    "HealthBoard",
    "HealthComponent",
    "HealthListener",
    "HealthMonitor",
    "HealthStatus",
    "HealthTarget",
    "HEARTBEAT_BREAKER_CONFIG",
    "HeartbeatError",
    "HeartbeatProtocol",
    "HeartbeatTimeout",
    "Hello",
    "Instance",
    "InstanceAdded",
    "InstanceChanged",
    "InstanceRemoved",
    "KeepaliveOptions",
    "KeyValueStore",
    "LeaseStore",
    "Liveness",
    "LivenessBinding",
    "LivenessRegistry",
    "LiveSet",
    "local_health",
    "LocalHealth",
    "LocalProtocolError",
    "MemoryStore",
    "NEED_DATA",
    "notify_systemd",
    "open_connection",
    "open_discovery",
    "open_health_monitor",
    "open_memory_store",
    "open_reconnecting_client",
    "open_registration",
    "open_service_supervisor",
    "open_stream_connection",
    "OutlierEjection",
    "OutlierStatistics",
    "PeerHealthChanged",
    "PeerInfo",
    "PeerRecovered",
    "PeerSuspected",
    "Permit",
    "PhiAccrualDetector",
    "Ping",
    "PingReceived",
    "Pong",
    "PongReceived",
    "ProtocolError",
    "publish_peers",
    "read_keepalive",
    "ReconnectFailed",
    "ReconnectingClient",
    "Registration",
    "RegistrationState",
    "RemoteProtocolError",
    "RestartBudget",
    "RestartPlan",
    "RestartStatistics",
    "RestartType",
    "Role",
    "serve_tcp",
    "Server",
    "ServerStatistics",
    "ServiceEvent",
    "ServiceListener",
    "ServiceStatistics",
    "ServiceSupervisor",
    "SilenceRule",
    "State",
    "Stopped",
    "StoreUnavailable",
    "Strategy",
    "SupervisorEvent",
    "SupervisorGaveUp",
    "SupervisorListener",
    "SupervisorState",
    "SupervisorStopped",
    "SupportsSockopt",
    "SystemdNotifier",
    "UndeliveredMessages",
    "UnknownEndpoint",
    "WatchCompacted",
    "WindowKind",
]

__version__ = "0.1.0"
