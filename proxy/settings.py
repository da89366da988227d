"""The proxy's configuration: environment variables only, prefix ``PDPROXY_``.

Every field's description is the operator documentation: the README table and
``config/pdproxy.env`` are generated from this class (``python -m proxy.settings``), so
they cannot drift from the code.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "PDPROXY_"


class PoolDownPolicy(str, Enum):
    """What to do when every instance of one pool is unhealthy."""

    colocated = "colocated"  # run the whole request on an instance of the other pool
    fail = "fail"  # answer 503 at once


class PrefillPolicy(str, Enum):
    round_robin = "round_robin"
    least_load = "least_load"
    prefix_affinity = "prefix_affinity"


class DecodePolicy(str, Enum):
    least_load = "least_load"
    power_of_two = "power_of_two"


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def check_base_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http(s) base URL")
    try:
        parts.port  # noqa: B018 - urlsplit checks the port only when it is read
    except ValueError as exc:
        raise ValueError(f"{url!r}: {exc}") from None
    if parts.path.rstrip("/").endswith("/v1"):
        raise ValueError(f"{url!r}: give the base URL without /v1")
    if parts.query or parts.fragment:
        raise ValueError(f"{url!r}: a base URL has no query or fragment")
    return url.rstrip("/")


UrlList = Annotated[list[str], NoDecode]
KeyList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # --- backends -------------------------------------------------------------------
    prefill_urls: UrlList = Field(
        description="Comma-separated base URLs (no /v1) of the vLLM servers used for "
        "prefill. A hostname that resolves to several addresses stands for all of them "
        "when PDPROXY_DISCOVERY_INTERVAL is set.",
    )
    decode_urls: UrlList = Field(
        description="Comma-separated base URLs (no /v1) of the vLLM servers used for decode.",
    )
    backend_api_key: str | None = Field(
        default=None,
        description="Bearer key sent to the vLLM servers (their --api-key). A client's "
        "own key is never forwarded unless PDPROXY_FORWARD_CLIENT_AUTH is set.",
    )

    discovery_interval: float = Field(
        default=0.0,
        ge=0,
        description="Seconds between DNS re-resolutions of the backend URLs' hostnames; each "
        "address becomes an instance (a Kubernetes headless Service). 0 turns discovery off.",
    )
    admin_key: str | None = Field(
        default=None,
        description="Enables the admin API (/admin/instances: list, add, drain, remove "
        "instances) for callers presenting this bearer key. Off when unset.",
    )
    min_prefill_tokens: int = Field(
        default=0,
        ge=0,
        description="Prompts estimated shorter than this many tokens skip P and run whole on "
        "a decode instance (conditional disaggregation). 0 disaggregates every request.",
    )

    # --- clients --------------------------------------------------------------------
    api_keys: KeyList = Field(
        default_factory=list,
        description="Comma-separated keys; when set, every /v1/* call needs "
        "'Authorization: Bearer <key>'.",
    )
    protect_ops_endpoints: bool = Field(
        default=False,
        description="Require an API key on /health, /ready, /metrics and /status too.",
    )
    forward_client_auth: bool = Field(
        default=False,
        description="Forward the client's Authorization header to the backends (only "
        "when PDPROXY_BACKEND_API_KEY is unset).",
    )
    max_concurrent_requests: int = Field(
        default=0,
        ge=0,
        description="Generation requests in flight per worker before new ones get 429 with "
        "Retry-After. 0 means no limit.",
    )
    max_tokens_limit: int = Field(
        default=0,
        ge=0,
        description="Largest max_tokens / max_completion_tokens a client may ask for (400 "
        "beyond). 0 means no limit.",
    )
    otel_endpoint: str | None = Field(
        default=None,
        description="OTLP/HTTP endpoint for OpenTelemetry traces (needs the 'tracing' "
        "extra). Off when unset; W3C traceparent is propagated to both legs either way.",
    )

    # --- listener -------------------------------------------------------------------
    host: str = Field(default="0.0.0.0", description="Address the proxy listens on.")
    port: int = Field(default=8000, ge=1, le=65535, description="Port the proxy listens on.")
    workers: int = Field(
        default=1, ge=1, le=256, description="Worker processes (each a full proxy)."
    )
    log_level: str = Field(
        default="info",
        description="debug, info, warning or error.",
        pattern=r"(?i)^(debug|info|warning|error|critical)$",
    )

    # --- timeouts (seconds) ---------------------------------------------------------
    connect_timeout: float = Field(
        default=3.0, gt=0, description="Time to open a TCP connection to a backend."
    )
    prefill_timeout: float = Field(
        default=120.0,
        gt=0,
        description="Whole prefill leg: queueing on P plus the prompt's prefill.",
    )
    first_byte_timeout: float = Field(
        default=120.0,
        gt=0,
        description="Decode leg until its first byte (KV pull and queueing included).",
    )
    idle_timeout: float = Field(
        default=60.0, gt=0, description="Longest silence allowed between two streamed chunks."
    )
    request_timeout: float = Field(
        default=3600.0, gt=0, description="Longest a whole request may take."
    )

    # --- stitching ------------------------------------------------------------------
    stitch: bool = Field(
        default=True,
        description="Stream P's first token at once and let D continue after it. When "
        "false, D regenerates from the transferred KV and only D is streamed.",
    )
    stitch_chat: bool = Field(
        default=True,
        description="Stitch chat requests too. Turn off when the servers run a reasoning "
        "or tool-call parser whose output the proxy cannot rebuild from raw tokens.",
    )

    # --- routing and resilience -----------------------------------------------------
    prefill_policy: PrefillPolicy = Field(
        default=PrefillPolicy.round_robin,
        description="How a prefill instance is chosen: round_robin, least_load or "
        "prefix_affinity (the same prompt prefix goes to the same P, so its prefix cache hits).",
    )
    decode_policy: DecodePolicy = Field(
        default=DecodePolicy.least_load,
        description="How a decode instance is chosen: least_load or power_of_two.",
    )
    prefill_attempts: int = Field(
        default=2, ge=1, le=10, description="Instances tried for the prefill leg before giving up."
    )
    decode_attempts: int = Field(
        default=2,
        ge=1,
        le=10,
        description="Instances tried for the decode leg, as long as none has sent a byte.",
    )
    no_prefill_policy: PoolDownPolicy = Field(
        default=PoolDownPolicy.colocated,
        description="No healthy prefill instance: 'colocated' runs the whole request on a "
        "decode instance; 'fail' answers 503.",
    )
    no_decode_policy: PoolDownPolicy = Field(
        default=PoolDownPolicy.colocated,
        description="No healthy decode instance: 'colocated' runs the whole request on a "
        "prefill instance; 'fail' answers 503.",
    )
    eject_after_failures: int = Field(
        default=3,
        ge=1,
        description="Consecutive failures (connection errors, timeouts, 5xx; never a "
        "client's 4xx) that take an instance out of rotation.",
    )
    eject_seconds: float = Field(
        default=10.0,
        gt=0,
        description="How long an ejected instance stays out before it is tried again.",
    )
    health_interval: float = Field(
        default=5.0, gt=0, description="Seconds between active health checks of every instance."
    )
    health_timeout: float = Field(default=2.0, gt=0, description="Deadline of one health check.")
    canary_interval: float = Field(
        default=30.0,
        gt=0,
        description="Seconds between readiness canaries: a real two-token P/D generation "
        "through the proxy's own request path. /ready is true only after one passed.",
    )
    canary_timeout: float = Field(
        default=30.0, gt=0, description="Deadline of one canary generation."
    )
    kv_release_timeout: float = Field(
        default=2.0,
        gt=0,
        description="Deadline for telling P to free the KV of an abandoned request.",
    )

    # --- streams that outlive their decode server ------------------------------------
    max_resumes: int = Field(
        default=2,
        ge=0,
        le=10,
        description="Times one streamed answer may continue on another decode instance "
        "after its decode server failed mid-stream (it recomputes the prompt and the "
        "tokens sent; the client sees one stream). 0: the stream ends with an error event.",
    )
    migrate_on_drain: bool = Field(
        default=True,
        description="Draining a decode instance (admin API) moves its live streams to "
        "other decode instances with their KV, so it can restart with no client noticing.",
    )
    migrate_kv: bool = Field(
        default=True,
        description="A stream asked to move (drain, rebalance) takes its KV along when its "
        "decode server's connector can hold it. False: the destination recomputes the "
        "prompt and the tokens sent instead (slower, needs no transfer).",
    )
    rebalance: bool = Field(
        default=False,
        description="Move live streams from the most to the least loaded decode instance "
        "(with their KV) when their loads differ by more than PDPROXY_REBALANCE_THRESHOLD.",
    )
    rebalance_interval: float = Field(
        default=5.0, gt=0, description="Seconds between two looks at the decode loads."
    )
    rebalance_threshold: float = Field(
        default=4.0,
        gt=0,
        description="Load difference (in running requests; KV usage counts 4 per full "
        "cache) between the most and the least loaded decode instance that moves streams.",
    )
    rebalance_max_moves: int = Field(default=2, ge=1, description="Streams moved per look at most.")
    migration_cooldown: float = Field(
        default=30.0,
        ge=0,
        description="A stream that moved is not moved again for this long (no ping-pong).",
    )
    migration_timeout: float = Field(
        default=3.0,
        gt=0,
        description="How long a move waits for the source to hold the stream's KV before "
        "it continues by recomputing instead.",
    )

    # --- connection pools -----------------------------------------------------------
    max_connections: int = Field(
        default=2048, ge=1, description="Open connections per backend pool, at most."
    )
    max_keepalive: int = Field(
        default=512, ge=0, description="Idle keep-alive connections kept per backend pool."
    )

    # --- limits ---------------------------------------------------------------------
    max_body_bytes: int = Field(
        default=32 * 1024 * 1024, ge=1024, description="Largest request body accepted (413 beyond)."
    )

    @field_validator("prefill_urls", "decode_urls", "api_keys", mode="before")
    @classmethod
    def _split_lists(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("prefill_urls", "decode_urls")
    @classmethod
    def _check_urls(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one URL is required")
        checked = [check_base_url(url) for url in value]
        if len(set(checked)) != len(checked):
            raise ValueError("a URL is listed twice")
        return checked

    @model_validator(mode="after")
    def _check_timeouts(self) -> "Settings":
        if self.request_timeout < max(self.prefill_timeout, self.first_byte_timeout):
            raise ValueError(
                "PDPROXY_REQUEST_TIMEOUT must be at least PDPROXY_PREFILL_TIMEOUT and "
                "PDPROXY_FIRST_BYTE_TIMEOUT"
            )
        return self


def describe_error(error: ValidationError) -> str:
    """One line per bad variable, named as the operator wrote it."""
    lines = []
    for item in error.errors():
        field = str(item["loc"][0]) if item["loc"] else ""
        name = ENV_PREFIX + field.upper() if field else "configuration"
        lines.append(f"{name}: {item['msg']}")
    return "\n".join(lines)


def load_settings(**overrides: object) -> Settings:
    return Settings(**overrides)  # type: ignore[arg-type]


# --- documentation generated from the class -------------------------------------------


def _default_text(name: str) -> str:
    field = Settings.model_fields[name]
    if field.is_required():
        return "(required)"
    default = field.get_default(call_default_factory=True)
    if isinstance(default, Enum):
        return default.value
    if isinstance(default, list):
        return ",".join(default)
    if isinstance(default, bool):
        return str(default).lower()
    return "" if default is None else str(default)


_EXAMPLES = {
    "prefill_urls": "http://prefill-0:8000,http://prefill-1:8000",
    "decode_urls": "http://decode-0:8000",
}


def env_file() -> str:
    """config/pdproxy.env: every setting with its default and meaning."""
    lines = [
        "# pdproxy settings (generated by `python -m proxy.settings env`; do not edit by hand)."
    ]
    for name, field in Settings.model_fields.items():
        lines.append("")
        lines += [f"# {part}" for part in _wrap(field.description or "")]
        if field.is_required():
            lines.append(f"{ENV_PREFIX}{name.upper()}={_EXAMPLES.get(name, '')}")
        else:
            lines.append(f"# {ENV_PREFIX}{name.upper()}={_default_text(name)}")
    return "\n".join(lines) + "\n"


def markdown_table() -> str:
    """The README's settings table."""
    rows = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = _default_text(name) or "(unset)"
        rows.append(f"| `{ENV_PREFIX}{name.upper()}` | `{default}` | {field.description} |")
    return "\n".join(rows) + "\n"


def _wrap(text: str, width: int = 88) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [""]


README_BEGIN, README_END = "<!-- settings-table:begin -->", "<!-- settings-table:end -->"


def readme_with_table(readme: str) -> str:
    """The README with its settings table regenerated between the markers."""
    head, rest = readme.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    return f"{head}{README_BEGIN}\n{markdown_table()}{README_END}{tail}"


if __name__ == "__main__":
    import sys
    from pathlib import Path

    command = sys.argv[1] if len(sys.argv) > 1 else "env"
    if command == "markdown":
        print(markdown_table(), end="")
    elif command == "write":  # regenerate README.md's table and config/pdproxy.env in place
        root = Path(__file__).resolve().parent.parent
        readme = root / "README.md"
        readme.write_text(readme_with_table(readme.read_text()))
        (root / "config").mkdir(exist_ok=True)
        (root / "config" / "pdproxy.env").write_text(env_file())
    else:
        print(env_file(), end="")
