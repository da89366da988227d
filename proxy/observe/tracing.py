"""Optional OpenTelemetry tracing: a span per request and one per leg.

Off unless ``PDPROXY_OTEL_ENDPOINT`` is set (and the ``tracing`` extra is installed).
Off, the client's W3C ``traceparent``/``tracestate`` still go to both legs unchanged, so
vLLM's own spans join the client's trace. On, the proxy's request span continues the
client's trace, each leg gets a child span, and each backend receives the traceparent of
its leg's span: the trace reads client → proxy → prefill / decode → vLLM.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("pdproxy.tracing")


class RequestTrace:
    """The spans of one request. The disabled form does nothing and costs nothing."""

    def leg_headers(self, leg: str, base: dict[str, str]) -> dict[str, str]:
        return base

    def end_leg(self, leg: str, error: str | None = None) -> None:
        return None

    def finish(self, status: int, mode: str) -> None:
        return None


DISABLED = RequestTrace()


class _Trace(RequestTrace):
    def __init__(self, tracer: Any, request_headers: dict[str, str], name: str) -> None:
        from opentelemetry import propagate, trace

        self._trace, self._propagate = trace, propagate
        self._tracer = tracer
        parent = propagate.extract(request_headers)
        self._span = tracer.start_span(name, context=parent, kind=trace.SpanKind.SERVER)
        self._legs: dict[str, Any] = {}

    def leg_headers(self, leg: str, base: dict[str, str]) -> dict[str, str]:
        previous = self._legs.pop(leg, None)
        if previous is not None:  # a retry: the failed attempt's span ends here
            previous.end()
        span = self._tracer.start_span(
            f"pdproxy.{leg}",
            context=self._trace.set_span_in_context(self._span),
            kind=self._trace.SpanKind.CLIENT,
        )
        self._legs[leg] = span
        headers = {k: v for k, v in base.items() if k not in ("traceparent", "tracestate")}
        self._propagate.inject(headers, context=self._trace.set_span_in_context(span))
        return headers

    def end_leg(self, leg: str, error: str | None = None) -> None:
        span = self._legs.pop(leg, None)
        if span is not None:
            if error:
                span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, error))
            span.end()

    def finish(self, status: int, mode: str) -> None:
        for leg in list(self._legs):
            self.end_leg(leg)
        self._span.set_attribute("http.response.status_code", status)
        self._span.set_attribute("pdproxy.mode", mode)
        if status >= 500:
            self._span.set_status(self._trace.Status(self._trace.StatusCode.ERROR))
        self._span.end()


class Tracing:
    """Holds the tracer provider when tracing is on."""

    def __init__(self, endpoint: str | None, exporter: Any = None) -> None:
        self._tracer = None
        self._provider = None
        if not endpoint and exporter is None:
            return
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

            if exporter is None:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

                exporter = OTLPSpanExporter(endpoint=endpoint)
                processor = BatchSpanProcessor(exporter)
            else:
                processor = SimpleSpanProcessor(exporter)
        except ImportError as exc:
            raise RuntimeError(
                "PDPROXY_OTEL_ENDPOINT is set but OpenTelemetry is not installed: "
                "pip install 'pdproxy[tracing]'"
            ) from exc
        self._provider = TracerProvider(resource=Resource.create({"service.name": "pdproxy"}))
        self._provider.add_span_processor(processor)
        self._tracer = self._provider.get_tracer("pdproxy")
        log.info("tracing to %s", endpoint or "a test exporter")

    def start(self, request_headers: dict[str, str], name: str) -> RequestTrace:
        if self._tracer is None:
            return DISABLED
        return _Trace(self._tracer, request_headers, name)

    def shutdown(self) -> None:
        if self._provider is not None:
            self._provider.shutdown()
