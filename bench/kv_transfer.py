"""KV transfer throughput of the host path vs raw loopback TCP, measured in the same run.

``python -m bench.kv_transfer [--out results.json] [--sizes 1,16,256] [--repeats 5]``

Two processes on loopback. The P process owns a fake KV cache (8 layers of
``(blocks, 2, 16, 8, 128)`` bf16, 512 KiB per block) and the real P-side transport
(:class:`engine_ext.transport_host.HostServer` with its :class:`SendRegistry`); this
process owns another cache and the real D-side :class:`HostClient`. A transfer moves
``size`` MiB of randomly scattered blocks (worst case: no contiguous runs) into other
random blocks and is timed from ``submit`` until the client reports the blocks written.
The baseline is ``sendall`` from a preallocated buffer into ``recv_into`` another, over
a fresh loopback TCP connection between the same two processes, alternated with the
transport runs so that both see the same machine load. Each figure is a median.

Prints a markdown table (throughput, ratio transport/raw; the goal is >= 0.8) and
writes the raw numbers as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import time
from typing import Any

import numpy as np
import torch

from .plots import draw_beside

MiB = 1 << 20
LAYERS, BLOCK_SHAPE, DTYPE = 8, (2, 16, 8, 128), torch.bfloat16
BLOCK_BYTES = LAYERS * int(np.prod(BLOCK_SHAPE)) * 2


def make_caches(num_blocks: int, seed: int | None, device: str = "cpu") -> dict[str, torch.Tensor]:
    if seed is None:
        return {
            f"layers.{i}": torch.zeros((num_blocks, *BLOCK_SHAPE), dtype=DTYPE, device=device)
            for i in range(LAYERS)
        }
    g = torch.Generator().manual_seed(seed)
    return {
        f"layers.{i}": torch.randn((num_blocks, *BLOCK_SHAPE), generator=g).to(DTYPE).to(device)
        for i in range(LAYERS)
    }


def copy_bandwidth(nbytes: int, repeats: int) -> dict[str, float]:
    """The device<->host copy bandwidth (pinned host memory): the host path's floor on a GPU."""
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    out = {}
    for name, dst, src in (("d2h_gbps", host, device), ("h2d_gbps", device, host)):
        times = []
        for _ in range(repeats + 1):
            torch.cuda.synchronize()
            start = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        out[name] = nbytes / statistics.median(times[1:]) / 1e9
    # A whole hop copies twice (D2H on P, H2D on D): its bandwidth bound.
    out["d2h_then_h2d_gbps"] = 1 / (1 / out["d2h_gbps"] + 1 / out["h2d_gbps"])
    return out


def settings(port: int, chunk_bytes: int | None = None):
    from engine_ext.config import PDSettings

    extra = (
        {"chunk_bytes": chunk_bytes, "max_inflight_bytes": 4 * chunk_bytes} if chunk_bytes else {}
    )
    return PDSettings(
        host="127.0.0.1",
        bind_host="127.0.0.1",
        zmq_port=port,
        control_port=0,
        pull_timeout_seconds=120,
        **extra,
    )


def p_process(
    conn,
    zmq_port: int,
    tcp_port: int,
    num_blocks: int,
    chunk_bytes: int | None,
    device: str = "cpu",
) -> None:
    """The prefill side: serves pulls with the real server; feeds the raw TCP baseline."""
    from engine_ext.layout import BlockIO, KVLayout
    from engine_ext.leases import SendRegistry
    from engine_ext.metadata import SendSpec
    from engine_ext.stats import WorkerCounters
    from engine_ext.transport_host import HostServer

    caches = make_caches(num_blocks, seed=1, device=device)
    layout = KVLayout.from_caches(caches, num_blocks, 1)
    registry = SendRegistry()
    server = HostServer(
        settings(zmq_port, chunk_bytes),
        zmq_port,
        registry,
        BlockIO(caches, layout),
        layout.digest(),
        layout.describe(),
        WorkerCounters(),
    ).start()
    raw = np.ones(max_bytes(num_blocks), np.uint8)
    listener = socket.create_server(("127.0.0.1", tcp_port))
    conn.send("ready")
    while True:
        cmd = conn.recv()
        if cmd[0] == "register":
            _, tid, blocks = cmd
            registry.register(SendSpec(tid, tid, tuple(blocks), consumers=1))
            conn.send("ok")
        elif cmd[0] == "raw":
            nbytes = cmd[1]
            conn.send("ok")
            sock, _ = listener.accept()
            with sock:
                sock.sendall(memoryview(raw)[:nbytes])
                sock.recv(1)  # the receiver's "got it"
        elif cmd[0] == "block":
            conn.send([t[cmd[1]].float().sum().item() for t in caches.values()])
        else:
            server.stop()
            listener.close()
            conn.send("bye")
            return


def max_bytes(num_blocks: int) -> int:
    return num_blocks * BLOCK_BYTES


def raw_tcp(conn, tcp_port: int, buf: bytearray, nbytes: int) -> float:
    conn.send(("raw", nbytes))
    conn.recv()
    view = memoryview(buf)
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", tcp_port)) as sock:
        got = 0
        while got < nbytes:
            n = sock.recv_into(view[got:nbytes], nbytes - got)
            if not n:
                raise RuntimeError("raw TCP sender closed early")
            got += n
        elapsed = time.perf_counter() - start
        sock.sendall(b"k")
    return elapsed


def run(
    sizes_mib: list[int], repeats: int, chunk_bytes: int | None = None, device: str = "cpu"
) -> dict[str, Any]:
    from devkit.servers import free_port
    from engine_ext.layout import BlockIO, KVLayout
    from engine_ext.metadata import PullSpec
    from engine_ext.stats import WorkerCounters
    from engine_ext.transport_pull import HostClient

    num_blocks = max(sizes_mib) * MiB // BLOCK_BYTES + 64
    zmq_port, tcp_port = free_port(), free_port()
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(
        target=p_process,
        args=(child, zmq_port, tcp_port, num_blocks, chunk_bytes, device),
        daemon=True,
    )
    proc.start()
    caches = make_caches(num_blocks, seed=None, device=device)
    layout = KVLayout.from_caches(caches, num_blocks, 1)
    client = HostClient(
        settings(free_port(), chunk_bytes),
        0,
        BlockIO(caches, layout),
        layout.digest(),
        layout.describe(),
        WorkerCounters(),
    ).start()
    buf = bytearray(max_bytes(num_blocks))
    rng = np.random.default_rng(0)
    results: list[dict[str, Any]] = []
    try:
        if parent.recv() != "ready":
            raise RuntimeError("P process failed to start")
        counter = 0
        for size in sizes_mib:
            n = max(1, size * MiB // BLOCK_BYTES)
            nbytes = n * BLOCK_BYTES
            raw_s, ours_s = [], []
            for rep in range(repeats + 1):  # the first round warms both paths up
                remote = rng.permutation(num_blocks)[:n].tolist()
                local = rng.permutation(num_blocks)[:n].tolist()
                counter += 1
                tid = f"bench-{counter}"
                parent.send(("register", tid, remote))
                parent.recv()
                start = time.perf_counter()
                client.submit(
                    PullSpec(
                        tid,
                        tid,
                        "127.0.0.1",
                        zmq_port,
                        tuple(remote),
                        tuple(local),
                        {"device": device.split(":")[0]},
                        f"d/{tid}",
                    )
                )
                result = None
                while result is None:
                    out = client.take_results()
                    result = out[0] if out else None
                    if result is None:
                        time.sleep(0.0002)
                elapsed = time.perf_counter() - start
                if not result.ok:
                    raise RuntimeError(f"transfer failed: {result.reason}")
                raw_elapsed = raw_tcp(parent, tcp_port, buf, nbytes)
                if rep:
                    ours_s.append(elapsed)
                    raw_s.append(raw_elapsed)
            # Spot-check that the bytes landed where they should.
            parent.send(("block", remote[-1]))
            want = parent.recv()
            got = [t[local[-1]].float().sum().item() for t in caches.values()]
            if want != got:
                raise RuntimeError("transferred block differs from the source")
            raw_med, ours_med = statistics.median(raw_s), statistics.median(ours_s)
            extra = copy_bandwidth(nbytes, repeats) if device.startswith("cuda") else {}
            if extra:
                extra["ratio_to_copy"] = (nbytes / ours_med / 1e9) / extra["d2h_then_h2d_gbps"]
            results.append(
                {
                    **extra,
                    "size_mib": size,
                    "bytes": nbytes,
                    "blocks": n,
                    "repeats": repeats,
                    "raw_tcp_gbps": nbytes / raw_med / 1e9,
                    "transport_gbps": nbytes / ours_med / 1e9,
                    "ratio": raw_med / ours_med,
                    "raw_tcp_seconds": raw_s,
                    "transport_seconds": ours_s,
                }
            )
    finally:
        client.stop()
        parent.send(("stop",))
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
    return {
        "benchmark": "kv_transfer_host_path",
        "device": device,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "layout": {
            "layers": LAYERS,
            "block_shape": BLOCK_SHAPE,
            "dtype": str(DTYPE),
            "block_bytes": BLOCK_BYTES,
        },
        "chunk_bytes": settings(1, chunk_bytes).chunk_bytes,
        "results": results,
    }


def table(report: dict[str, Any]) -> str:
    cuda = report.get("device", "cpu").startswith("cuda")
    head = "| payload | blocks | raw TCP GB/s | PD host path GB/s | ratio |"
    rule = "|---:|---:|---:|---:|---:|"
    if cuda:
        head += " D2H GB/s | H2D GB/s | D2H+H2D GB/s | ratio to copies |"
        rule += "---:|---:|---:|---:|"
    rows = [head, rule]
    for r in report["results"]:
        row = (
            f"| {r['size_mib']} MiB | {r['blocks']} | {r['raw_tcp_gbps']:.2f} | "
            f"{r['transport_gbps']:.2f} | {r['ratio']:.2f} |"
        )
        if cuda:
            row += (
                f" {r['d2h_gbps']:.1f} | {r['h2d_gbps']:.1f} | {r['d2h_then_h2d_gbps']:.1f} "
                f"| {r['ratio_to_copy']:.2f} |"
            )
        rows.append(row)
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,16,256", help="payload sizes in MiB, comma separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--chunk-mib", type=int, help="override chunk_bytes (MiB); default: the connector's"
    )
    parser.add_argument(
        "--device", default="cpu", help="where the KV caches live: cpu or cuda (the GPU host path)"
    )
    parser.add_argument("--out", help="write the JSON report here")
    args = parser.parse_args(argv)
    chunk = args.chunk_mib * MiB if args.chunk_mib else None
    report = run([int(s) for s in args.sizes.split(",")], args.repeats, chunk, args.device)
    print(table(report))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=2)
        draw_beside(args.out)
    return report


if __name__ == "__main__":
    main()
