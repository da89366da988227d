"""``bench.migration`` reads each move from the proxy's log, as the proxy writes it."""

from __future__ import annotations

import json
import logging

from bench.migration import moves_logged
from proxy.cli import JsonFormatter


def test_the_moves_are_read_from_the_proxys_json_log_lines(tmp_path):
    move = {"event": "stream_moved", "request_id": "move-1", "kind": "kv", "pause_ms": 41.2}
    other = {"event": "stream_resumed", "request_id": "move-2"}
    formatter = JsonFormatter()
    lines = [
        "INFO:     Application startup complete.",
        *(
            formatter.format(logging.makeLogRecord({"msg": json.dumps(m), "levelname": "INFO"}))
            for m in (move, other)
        ),
        '{"request_id":"move-1","endpoint":"completions","outcome":"ok"}',  # the access log
    ]
    log = tmp_path / "proxy.log"
    log.write_text("\n".join(lines) + "\n")
    assert moves_logged(log) == [move]
