"""The goodput benchmark's workload and accounting (the run itself needs vLLM servers)."""

from bench.goodput import MIXES, Outcome, Slo, summarize, workload


def test_same_seed_same_requests_for_every_arm():
    first, again = workload("rag", 2.0, 30.0, seed=7), workload("rag", 2.0, 30.0, seed=7)
    assert [(j.at, j.prompt_len, j.output) for j in first] == [
        (j.at, j.prompt_len, j.output) for j in again
    ]
    assert 30 < len(first) < 90  # Poisson at 2/s over 30 s
    _, low, high = MIXES["rag"]["prompt"]
    assert all(low <= j.prompt_len <= high for j in first)
    assert workload("rag", 2.0, 30.0, seed=8)[0].at != first[0].at


def test_every_arm_gets_fresh_prompts_of_the_same_lengths():
    # The arms share the servers: one arm's prompt would be the next one's cache hit.
    job = workload("chat", 1.0, 10.0, seed=1)[0]
    pd, colocated = job.prompt("pd", 1), job.prompt("colocated", 1)
    assert len(pd) == len(colocated) == job.prompt_len and pd != colocated
    assert job.prompt("pd", 1) == pd


def test_goodput_counts_requests_within_both_slos():
    outcomes = [
        Outcome(ttft=0.2, gaps=[0.05] * 10, tokens=11),  # meets both
        Outcome(ttft=1.5, gaps=[0.05] * 10, tokens=11),  # TTFT too late
        Outcome(ttft=0.2, gaps=[0.05] * 9 + [1.5], tokens=11),  # TPOT 0.195 s: too slow
        Outcome(error="HTTP 500"),
    ]
    got = summarize(outcomes, seconds=2.0, makespan=4.0, slo=Slo(ttft=1.0, tpot=0.1, gap=1.0))
    assert got["requests"] == 4 and got["errors"] == 1
    assert got["goodput_rps"] == 0.5  # one request in 2 s of arrivals
    assert got["goodput_loose_rps"] == 1.5  # SLOs doubled: all three
    assert got["worst_gap_max_ms"] == 1500.0
    assert got["goodput_gap_rps"] == 0.5  # the third one paused 1.5 s once
    assert got["samples_ms"][2] == [200.0, 195.0, 1500.0]
