"""Every GATEWAY_* setting in one typed place, parsed and validated from the environment at start-up.

No I/O beyond reading the mapping it is given. A bad value raises `ConfigError`, which the CLI turns into one
line on stderr naming the variable, the value and what is allowed, and exit status 2.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from gateway.errors import GatewayError


class ConfigError(GatewayError):
    """A setting has a value that is not allowed."""

    def __init__(self, name: str, value: str, allowed: str) -> None:
        super().__init__(f"{name}={value!r} is invalid: expected {allowed}")
        self.name = name
        self.value = value
        self.allowed = allowed


# --- parsers: each takes the raw string and returns the value, or raises ValueError(allowed) -------------

def _int(lo: int, hi: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            v = int(raw)
        except ValueError:
            raise ValueError(f"an integer from {lo} to {hi}") from None
        if not lo <= v <= hi:
            raise ValueError(f"an integer from {lo} to {hi}")
        return v

    return parse


def _float(lo: float, hi: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            v = float(raw)
        except ValueError:
            raise ValueError(f"a number from {lo:g} to {hi:g}") from None
        if not lo <= v <= hi or v != v:
            raise ValueError(f"a number from {lo:g} to {hi:g}")
        return v

    return parse


def _bool(raw: str) -> bool:
    v = raw.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError("one of true/false, 1/0, yes/no, on/off")


def _choice(*options: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        v = raw.strip().lower()
        if v not in options:
            raise ValueError("one of " + ", ".join(options))
        return v

    return parse


def _str(raw: str) -> str:
    return raw


def _optional_str(raw: str) -> str | None:
    return raw or None


def _url(*schemes: str) -> Callable[[str], str | None]:
    def parse(raw: str) -> str | None:
        if not raw:
            return None
        parts = urlsplit(raw)
        if parts.scheme not in schemes or not parts.netloc:
            raise ValueError("an absolute URL with scheme " + " or ".join(schemes))
        return raw.rstrip("/")

    return parse


def _users(raw: str) -> tuple[tuple[str, str], ...]:
    users: list[tuple[str, str]] = []
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, password = item.partition(":")
        if not sep or not name or not password:
            raise ValueError("comma-separated username:password pairs")
        users.append((name, password))
    return tuple(users)


def _log_level(raw: str) -> str:
    v = raw.strip().upper()
    if v not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError("one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
    return v


@dataclass(frozen=True)
class Spec:
    """How one environment variable is read: its name, parser, default (as the raw string) and meaning."""

    name: str
    attr: str
    parse: Callable[[str], Any]
    default: str
    help: str


# The table the README mirrors (tests/unit/test_config.py checks that every name here is documented there).
SPECS: tuple[Spec, ...] = (
    Spec("GATEWAY_HOST", "host", _str, "127.0.0.1", "Address to listen on."),
    Spec("GATEWAY_PORT", "port", _int(0, 65535), "8080", "TCP port for HTTP and WebSocket (0 = any free port)."),
    Spec("GATEWAY_PUBLIC_URL", "public_url", _url("http", "https"), "",
         "Base URL clients reach the gateway at; absolute URLs in the session resource derive from it "
         "(default `http://<host>:<port>`; `https` yields `wss://`)."),
    Spec("GATEWAY_LOG_LEVEL", "log_level", _log_level, "INFO",
         "Log level. Libraries' own INFO lines (aiosmtpd, picows, aio-pika) show only with DEBUG."),
    Spec("GATEWAY_LOG_FORMAT", "log_format", _choice("text", "json"), "text",
         "Log lines on stderr: `text` for people, or `json`: one JSON object per line with time, level, logger, "
         "message, and fields such as `username` where they exist (README, Logs)."),
    Spec("GATEWAY_REQUIRE_NATIVE", "require_native", _bool, "false",
         "Refuse to start unless the compiled (Cython) hot path is importable."),
    Spec("GATEWAY_USERS", "users", _users, "bob@example.com:bob,alice@example.com:alice",
         "Embedded directory: comma-separated `username:password` pairs for Basic authentication."),
    Spec("GATEWAY_JWT_SECRET", "jwt_secret", _optional_str, "",
         "HS256 secret for Bearer JWTs (the username is `sub`). Unset = HS256 off."),
    Spec("GATEWAY_JWT_PUBLIC_KEY", "jwt_public_key", _optional_str, "",
         "Path to a PEM public key for RS256/ES256 Bearer JWTs. Unset = off."),
    Spec("GATEWAY_TICKET_TTL", "ticket_ttl", _float(1, 3600), "60",
         "Seconds a one-time WebSocket ticket (`POST /jmap/ws/ticket`) stays valid."),
    Spec("GATEWAY_TICKET_SECRET", "ticket_secret", _optional_str, "",
         "Key that signs WebSocket tickets, so that any process or host with the same key redeems them (workers "
         "share one automatically). Unset = a random key per start."),
    Spec("GATEWAY_REQUIRE_SUBPROTOCOL", "require_subprotocol", _bool, "true",
         "Require `jmap` in `Sec-WebSocket-Protocol` (HTTP 400 without it); false accepts such clients "
         "without echoing a subprotocol."),
    Spec("GATEWAY_MAX_SIZE_REQUEST", "max_size_request", _int(1024, 1 << 30), "10000000",
         "`maxSizeRequest` advertised in the session (bytes of one JMAP request)."),
    Spec("GATEWAY_MAX_MESSAGE_BYTES", "max_message_bytes", _int(0, 1 << 30), "0",
         "Largest WebSocket message accepted after reassembly (and inflation); larger closes with 1009. "
         "0 = `GATEWAY_MAX_SIZE_REQUEST`."),
    Spec("GATEWAY_MAX_CALLS_IN_REQUEST", "max_calls_in_request", _int(1, 10000), "32",
         "`maxCallsInRequest`: method calls allowed in one request."),
    Spec("GATEWAY_MAX_CONCURRENT_REQUESTS", "max_concurrent_requests", _int(1, 10000), "8",
         "`maxConcurrentRequests`: requests in flight per connection (and per HTTP user)."),
    Spec("GATEWAY_MAX_OBJECTS_IN_GET", "max_objects_in_get", _int(1, 1_000_000), "500",
         "`maxObjectsInGet` advertised in the session."),
    Spec("GATEWAY_MAX_OBJECTS_IN_SET", "max_objects_in_set", _int(1, 1_000_000), "500",
         "`maxObjectsInSet` advertised in the session."),
    Spec("GATEWAY_MAX_SIZE_UPLOAD", "max_size_upload", _int(0, 1 << 40), "50000000",
         "`maxSizeUpload` advertised in the session."),
    Spec("GATEWAY_MAX_CONCURRENT_UPLOAD", "max_concurrent_upload", _int(1, 1000), "4",
         "`maxConcurrentUpload` advertised in the session."),
    # --- limits on hostile input (README "Limits") ---
    Spec("GATEWAY_MAX_JSON_DEPTH", "max_json_depth", _int(8, 512), "64",
         "Deepest nesting of arrays and objects accepted in client JSON (socket messages, `/jmap/api` bodies); "
         "deeper gets `notJSON` (HTTP 400) before it is parsed. JMAP needs about 20 levels."),
    Spec("GATEWAY_MAX_HEAD_BYTES", "max_head_bytes", _int(1024, 1 << 20), "16384",
         "Largest HTTP request head (request line and headers) accepted; larger gets 431 and the connection "
         "is closed."),
    # --- permessage-deflate (RFC 7692) ---
    Spec("GATEWAY_DEFLATE", "deflate", _bool, "true",
         "Accept permessage-deflate offers (always with server_ and client_no_context_takeover)."),
    Spec("GATEWAY_DEFLATE_LEVEL", "deflate_level", _int(1, 9), "6", "zlib compression level of outgoing messages."),
    Spec("GATEWAY_DEFLATE_MIN_BYTES", "deflate_min_bytes", _int(0, 1 << 30), "128",
         "Messages smaller than this are sent uncompressed (RFC 7692 allows it per message)."),
    # --- push fan-out ---
    Spec("GATEWAY_BUS", "bus", _choice("memory", "amqp"), "memory",
         "Event bus: `memory` (in-process, embedded default) or `amqp` (RabbitMQ, Apache James's format)."),
    Spec("GATEWAY_ADMIN_TOKEN", "admin_token", _optional_str, "",
         "Bearer token for `/admin/*` (event injection, delegations). Unset = admin endpoints disabled."),
    Spec("GATEWAY_MAX_CONNECTIONS_PER_USER", "max_connections_per_user", _int(1, 1_000_000), "64",
         "WebSockets one user may hold on this process; the next upgrade gets HTTP 429."),
    Spec("GATEWAY_PING_INTERVAL", "ping_interval", _float(0, 86400), "30",
         "Seconds of silence after which the server pings a socket (0 = no pings)."),
    Spec("GATEWAY_PING_TIMEOUT", "ping_timeout", _float(0.05, 3600), "10",
         "Seconds to wait for the pong before closing the socket."),
    Spec("GATEWAY_PUSH_COALESCE_MS", "push_coalesce_ms", _int(0, 60_000), "0",
         "Merge a session's StateChanges within this window into one (0 = push at once)."),
    Spec("GATEWAY_SLOW_CLIENT_TIMEOUT", "slow_client_timeout", _float(0.1, 86400), "30",
         "Seconds a socket may stay paused (write buffer over its high-water mark) before it is closed with 1013."),
    Spec("GATEWAY_SLOW_CLIENT_MAX_BYTES", "slow_client_max_bytes", _int(1024, 1 << 34), "4194304",
         "Bytes of responses a paused socket may have buffered before it is closed with 1013."),
    Spec("GATEWAY_WRITE_HIGH_WATER", "write_high_water", _int(1024, 1 << 30), "65536",
         "Write-buffer high-water mark per socket (bytes); above it the socket counts as paused."),
    Spec("GATEWAY_SOCKET_SNDBUF", "socket_sndbuf", _int(0, 1 << 30), "0",
         "SO_SNDBUF of each WebSocket (bytes; 0 = the kernel's autotuning, up to several MiB per socket). A cap "
         "bounds the kernel memory a client that stops reading can hold, and makes it count as slow sooner."),
    Spec("GATEWAY_GC_FREEZE_AFTER", "gc_freeze_after", _int(0, 10_000_000), "1000",
         "Freeze long-lived objects out of the garbage collector's full collections (gc.freeze) after start-up "
         "and whenever held connections grew by this many (0 = never: CPython's collector as it is)."),
    Spec("GATEWAY_SHUTDOWN_GRACE", "shutdown_grace", _float(0, 3600), "10",
         "Seconds SIGTERM/SIGINT waits for in-flight requests before closing every socket with 1001."),
    # --- RabbitMQ bus ---
    Spec("GATEWAY_AMQP_URL", "amqp_url", _url("amqp", "amqps"), "amqp://guest:guest@127.0.0.1:5672/",
         "RabbitMQ URL (GATEWAY_BUS=amqp)."),
    Spec("GATEWAY_AMQP_EXCHANGE", "amqp_exchange", _str, "jmapEvent-exchange",
         "Direct, durable exchange of James's JMAP event bus (declared if absent)."),
    Spec("GATEWAY_AMQP_PREFETCH", "amqp_prefetch", _int(1, 65535), "256",
         "Unacknowledged messages the node's consumer may hold."),
    Spec("GATEWAY_AMQP_HEARTBEAT", "amqp_heartbeat", _int(0, 3600), "30", "AMQP heartbeat in seconds (0 = off)."),
    Spec("GATEWAY_AMQP_CONNECTION_NAME", "amqp_connection_name", _str, "jmap-push-gateway",
         "Connection name shown in the RabbitMQ management UI (the node id is appended)."),
    Spec("GATEWAY_AMQP_QUEUE_TYPE", "amqp_queue_type", _choice("classic", "quorum"), "classic",
         "`x-queue-type` of the node's queue."),
    Spec("GATEWAY_AMQP_UNBIND_DELAY", "amqp_unbind_delay", _float(0, 3600), "5",
         "Seconds to keep a username's binding after its last local session left (absorbs reconnects)."),
    Spec("GATEWAY_WORKERS", "workers", _int(1, 256), "1",
         "Worker processes sharing the port (SO_REUSEPORT), each its own bus node."),
    # --- embedded mail backend ---
    Spec("GATEWAY_DATA_DIR", "data_dir", _str, "./data", "Directory of the embedded backend's data."),
    Spec("GATEWAY_DB", "db", _str, "",
         "SQLite database path (`:memory:` allowed); default `<GATEWAY_DATA_DIR>/mail.sqlite3`."),
    Spec("GATEWAY_SMTP_HOST", "smtp_host", _str, "127.0.0.1", "Address of the embedded SMTP listener."),
    Spec("GATEWAY_SMTP_PORT", "smtp_port", _int(0, 65535), "2525", "Port of the embedded SMTP listener (0 = off)."),
    # --- front mode (an upstream JMAP server answers requests; DESIGN.md §1) ---
    Spec("GATEWAY_UPSTREAM_URL", "upstream_url", _url("http", "https"), "",
         "Session URL of an upstream JMAP server (e.g. `https://james.example.com/jmap/session`); set = front mode: "
         "requests go to its apiUrl with the client's credentials, which it validates. Unset = embedded backend."),
    Spec("GATEWAY_AUTH_CACHE_TTL", "auth_cache_ttl", _float(0, 86400), "60",
         "Front mode: seconds an upstream-validated session is reused for the same credentials (kept under a "
         "salted hash, never the credentials; 0 = ask the upstream at every authentication)."),
    Spec("GATEWAY_AUTH_RECHECK", "auth_recheck", _float(0, 86400), "600",
         "Front mode: seconds between re-validations of an open socket's credentials; revoked ones close it with "
         "1008 (0 = never)."),
    Spec("GATEWAY_PROXY_HTTP", "proxy_http", _bool, "false",
         "Front mode: advertise this gateway's apiUrl, downloadUrl and uploadUrl in the session (forwarded to the "
         "upstream) instead of the upstream's own."),
    Spec("GATEWAY_UPSTREAM_TIMEOUT", "upstream_timeout", _float(0.1, 3600), "30",
         "Front mode: seconds one upstream HTTP call may take before it counts as unavailable (503)."),
    Spec("GATEWAY_UPSTREAM_MAX_CONNECTIONS", "upstream_max_connections", _int(1, 100_000), "256",
         "Front mode: keep-alive HTTP connections to the upstream this process may open (the pool's size)."),
    Spec("GATEWAY_UPSTREAM_EVENTS", "upstream_events", _choice("bus", "eventsource"), "bus",
         "Front mode: where state changes come from. `bus` = GATEWAY_BUS (`amqp`: the upstream's RabbitMQ, Apache "
         "James's events); `eventsource` = the upstream's own RFC 8620 §7.3 `eventSourceUrl`, one stream per "
         "account with local sessions, read with one of its sessions' credentials (needs GATEWAY_BUS=memory)."),
    Spec("GATEWAY_UPSTREAM_EVENT_STREAMS", "upstream_event_streams", _int(1, 1_000_000), "10000",
         "Front mode with GATEWAY_UPSTREAM_EVENTS=eventsource: upstream event streams this process may hold (one "
         "per account with local sessions); accounts beyond it are refused a stream (logged once, counted) and "
         "their states are re-read once a minute instead."),
)


@dataclass(frozen=True)
class Settings:
    """The validated configuration of one gateway process. Its defaults live in SPECS only: `Settings.defaults()`
    (or `load({})`) is a complete configuration, and `replace` derives others from it."""

    host: str
    port: int
    public_url: str | None
    log_level: str
    log_format: str
    require_native: bool
    users: tuple[tuple[str, str], ...]
    jwt_secret: str | None
    jwt_public_key: str | None
    ticket_ttl: float
    ticket_secret: str | None
    require_subprotocol: bool
    max_size_request: int
    max_message_bytes: int
    max_calls_in_request: int
    max_concurrent_requests: int
    max_objects_in_get: int
    max_objects_in_set: int
    max_size_upload: int
    max_concurrent_upload: int
    max_json_depth: int
    max_head_bytes: int
    deflate: bool
    deflate_level: int
    deflate_min_bytes: int
    bus: str
    admin_token: str | None
    max_connections_per_user: int
    ping_interval: float
    ping_timeout: float
    push_coalesce_ms: int
    slow_client_timeout: float
    slow_client_max_bytes: int
    write_high_water: int
    socket_sndbuf: int
    gc_freeze_after: int
    shutdown_grace: float
    amqp_url: str | None
    amqp_exchange: str
    amqp_prefetch: int
    amqp_heartbeat: int
    amqp_connection_name: str
    amqp_queue_type: str
    amqp_unbind_delay: float
    workers: int
    data_dir: str
    db: str
    smtp_host: str
    smtp_port: int
    upstream_url: str | None
    auth_cache_ttl: float
    auth_recheck: float
    proxy_http: bool
    upstream_timeout: float
    upstream_max_connections: int
    upstream_events: str
    upstream_event_streams: int

    @property
    def message_limit(self) -> int:
        """The effective per-message byte limit (GATEWAY_MAX_MESSAGE_BYTES, defaulting to maxSizeRequest)."""
        return self.max_message_bytes or self.max_size_request

    @property
    def db_path(self) -> str:
        """GATEWAY_DB, defaulting to a file under GATEWAY_DATA_DIR."""
        return self.db or f"{self.data_dir.rstrip('/')}/mail.sqlite3"

    def base_url(self, port: int | None = None) -> str:
        """Public base URL without a trailing slash; `port` is the bound port when GATEWAY_PORT was 0."""
        if self.public_url:
            return self.public_url
        return f"http://{self.host}:{port if port is not None else self.port}"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @staticmethod
    def defaults(**changes: Any) -> Settings:
        """Every setting at its SPECS default, with `changes` (attribute names) applied."""
        return load({}).replace(**changes)


def load(env: Mapping[str, str]) -> Settings:
    """Read every setting from `env` (defaults where unset); raise ConfigError on the first bad value."""
    values: dict[str, Any] = {}
    for spec in SPECS:
        raw = env.get(spec.name)
        if raw is None:
            raw = spec.default
        try:
            values[spec.attr] = spec.parse(raw)
        except ValueError as exc:
            raise ConfigError(spec.name, raw, str(exc)) from None
    settings = Settings(**values)
    if settings.upstream_events == "eventsource":
        # One source of events per process: the upstream's streams replace the bus (DESIGN.md §1).
        if settings.upstream_url is None:
            raise ConfigError("GATEWAY_UPSTREAM_EVENTS", "eventsource",
                              "`bus` without GATEWAY_UPSTREAM_URL (the all-in-one role's events are its own)")
        if settings.bus != "memory":
            raise ConfigError("GATEWAY_UPSTREAM_EVENTS", "eventsource",
                              f"`bus` with GATEWAY_BUS={settings.bus} (events come from one source: the bus, or "
                              "the upstream's event streams with GATEWAY_BUS=memory)")
    if settings.jwt_public_key is not None:
        try:
            with open(settings.jwt_public_key, "rb") as fh:
                fh.read(1)
        except OSError:
            raise ConfigError("GATEWAY_JWT_PUBLIC_KEY", settings.jwt_public_key,
                              "the path of a readable PEM public key") from None
    return settings
