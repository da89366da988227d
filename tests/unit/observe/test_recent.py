"""The status page's last minute: one-second buckets, phase means and medians, errors."""

from proxy.observe.metrics import RequestRecord
from proxy.observe.recent import SAMPLES_PER_SECOND, Recent


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def finished(clock: Clock, mode="stitched", outcome="ok", status=200, error=None, rid="r"):
    record = RequestRecord(rid, "chat", mode=mode, outcome=outcome, status=status, error=error)
    record.finished = clock.now
    return record


def phases(prefill=0.01, handoff=0.002, decode=0.1, proxy=0.0005):
    return {"prefill": prefill, "handoff": handoff, "decode": decode, "proxy": proxy}


def test_counts_rates_and_phases_over_the_window():
    clock = Clock(1000.2)
    recent = Recent(window=60, clock=clock)
    recent.add(finished(clock), phases(prefill=0.010))
    recent.add(finished(clock, mode="colocated"), phases(prefill=0.0))
    clock.now = 1001.5
    recent.add(finished(clock), phases(prefill=0.030))
    recent.add(finished(clock, outcome="client_gone", status=499), phases())

    snap = recent.snapshot()
    assert snap["requests"] == 4 and snap["requests_per_s"] == round(4 / 60, 3)
    assert snap["per_second"][-2:] == [2, 2] and sum(snap["per_second"][:-2]) == 0
    assert snap["by_mode"] == {"stitched": 3, "colocated": 1}
    assert snap["by_outcome"] == {"ok": 3, "client_gone": 1}
    # Phases over the three served requests only (as pdproxy_phase_seconds).
    assert snap["phases"]["prefill"] == {"mean_ms": round(40 / 3, 3), "p50_ms": 10.0}
    assert snap["phases"]["decode"]["p50_ms"] == 100.0
    assert snap["errors"] == []  # a client leaving is not an error


def test_old_seconds_leave_the_window_and_reused_slots_start_empty():
    clock = Clock(500.0)
    recent = Recent(window=10, clock=clock)
    recent.add(finished(clock), phases())
    clock.now = 509.9
    assert recent.snapshot()["requests"] == 1
    clock.now = 510.0  # second 500 is now 10 s old
    assert recent.snapshot()["requests"] == 0
    recent.add(finished(clock), phases())  # same slot as second 500
    snap = recent.snapshot()
    assert snap["requests"] == 1 and snap["per_second"][-1] == 1
    assert snap["phases"]["prefill"]["mean_ms"] == 10.0


def test_an_idle_window_has_no_phase_figures():
    snap = Recent(window=5, clock=Clock(3.0)).snapshot()
    assert snap["requests"] == 0 and snap["per_second"] == [0] * 5
    assert snap["phases"]["decode"] == {"mean_ms": None, "p50_ms": None}


def test_errors_ring_keeps_the_newest_first():
    clock = Clock(10.0)
    recent = Recent(errors=3, clock=clock)
    for i in range(5):
        record = finished(clock, outcome="error", status=502, error=f"boom {i}", rid=f"id{i}")
        recent.add(record, phases())
    recent.add(finished(clock, outcome="client_error", status=400, error="bad", rid="c"), phases())
    errors = recent.snapshot()["errors"]
    assert [e["request_id"] for e in errors] == ["c", "id4", "id3"]
    assert errors[0]["status"] == 400 and errors[0]["message"] == "bad"
    assert errors[1]["endpoint"] == "chat" and errors[1]["time"] > 0


def test_samples_are_capped_per_second_but_means_stay_exact():
    clock = Clock(7.0)
    recent = Recent(clock=clock)
    for i in range(SAMPLES_PER_SECOND + 50):
        recent.add(finished(clock), phases(decode=1.0 if i < SAMPLES_PER_SECOND else 0.0))
    snap = recent.snapshot()
    assert len(recent._seconds[7 % 60].samples) == SAMPLES_PER_SECOND
    assert snap["phases"]["decode"]["p50_ms"] == 1000.0
    expected = SAMPLES_PER_SECOND * 1000 / (SAMPLES_PER_SECOND + 50)
    assert abs(snap["phases"]["decode"]["mean_ms"] - expected) < 1e-3
