"""Tracing: W3C traceparent reaches both legs; with OpenTelemetry on, spans nest."""

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from proxy.observe.tracing import Tracing
from tests.support.proxy_harness import harness

COMPLETION = {"model": "m", "prompt": "hello world", "max_tokens": 4, "temperature": 0}
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{CLIENT_TRACE}-b7ad6b7169203331-01"


async def test_traceparent_passes_through_when_tracing_is_off():
    async with harness() as h:
        await h.client.post(
            "/v1/completions",
            json=COMPLETION,
            headers={"traceparent": TRACEPARENT, "tracestate": "k=v"},
        )
        for name in ("p1", "d1"):
            headers = h.backends[name].calls[0]["headers"]
            assert headers["traceparent"] == TRACEPARENT and headers["tracestate"] == "k=v"


async def test_spans_per_request_and_leg_continue_the_clients_trace():
    exporter = InMemorySpanExporter()
    tracing = Tracing(None, exporter=exporter)
    async with harness(tracing=tracing) as h:
        for stream in (False, True):
            exporter.clear()
            response = await h.client.post(
                "/v1/completions",
                json=dict(COMPLETION, stream=stream),
                headers={"traceparent": TRACEPARENT},
            )
            assert response.status_code == 200
            spans = {span.name: span for span in exporter.get_finished_spans()}
            assert set(spans) == {"pdproxy.completions", "pdproxy.prefill", "pdproxy.decode"}
            root = spans["pdproxy.completions"]
            assert format(root.context.trace_id, "032x") == CLIENT_TRACE
            assert root.attributes["pdproxy.mode"] == "stitched"
            for leg in ("prefill", "decode"):
                span = spans[f"pdproxy.{leg}"]
                assert span.parent.span_id == root.context.span_id
                backend = h.backends["p1" if leg == "prefill" else "d1"].calls[-1]["headers"][
                    "traceparent"
                ]
                assert backend == f"00-{CLIENT_TRACE}-{format(span.context.span_id, '016x')}-01"
