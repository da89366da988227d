"""Scheduler side of the PDConnector (engine-core process): decisions, leases, metrics.

As P, it holds a finished prefill's blocks and returns the ``kv_transfer_params`` the
proxy copies verbatim into the decode request. As D, it claims the prompt tokens the
params cover (beyond a local prefix-cache hit) as an asynchronous load and tells its
workers which remote blocks go into which local blocks. Coordination is by
``transfer_id`` (generated here) and never by vLLM request ids, which vLLM suffixes
per engine. In steps with nothing to do it blocks instead of spinning
(:mod:`engine_ext.idle`).
"""

from __future__ import annotations

import logging
import queue
import time
import uuid
from typing import TYPE_CHECKING, Any

import zmq

from engine_ext import params as kv
from engine_ext.config import PDSettings
from engine_ext.control import ControlServer
from engine_ext.idle import IDLE_WAIT_MAX_SECONDS, IdleWaiter, engine_hooks, workers_have_news
from engine_ext.layout import blocks_to_load, spec_mismatch, spec_signature
from engine_ext.leases import LeaseTable
from engine_ext.metadata import Notice, PDConnectorMetadata, PullSpec, SendSpec
from engine_ext.migrations import MigrationTable
from engine_ext.stats import StatsRegistry
from engine_ext.wake import RECV, SEND, WakeListener

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger("vllm.pd.scheduler")


class PDScheduler:
    def __init__(
        self,
        vllm_config: Any,
        kv_cache_config: Any,
        settings: PDSettings,
        engine_id: str,
        hooks: tuple[queue.Queue | None, Any] | None = None,
    ):
        if len(kv_cache_config.kv_cache_groups) != 1:
            raise ValueError("PDConnector supports models with a single KV cache group")
        self.settings = settings
        self.engine_id = engine_id
        self.block_size = int(vllm_config.cache_config.block_size)
        self.layout = spec_signature(vllm_config, kv_cache_config)
        self.host = settings.advertised_host
        self.leases = LeaseTable(settings.lease_seconds)
        self.stats = StatsRegistry()
        self.migrations = MigrationTable()
        self._meta = PDConnectorMetadata()
        self._handled: set[str] = set()  # D requests whose remote params were acted on
        self._pulling: dict[str, float] = {}  # D requests waiting for their pull -> since
        self._warned: set[str] = set()
        input_queue, self._vllm_scheduler = hooks if hooks is not None else engine_hooks()
        data_parallel = int(getattr(vllm_config.parallel_config, "data_parallel_size", 1) or 1)
        if data_parallel > 1:  # DP engines step in waves together: never park one
            input_queue = None
        self.waiter = IdleWaiter(input_queue)
        self.wake_listener: WakeListener | None = None
        try:
            workers = int(getattr(vllm_config.parallel_config, "tensor_parallel_size", 1) or 1)
            self.wake_listener = WakeListener(engine_id, self.waiter.wake, workers)
        except (RuntimeError, OSError, zmq.ZMQError) as exc:  # then: short idle sleeps
            logger.warning("PDConnector: no wake-up channel from the workers: %s", exc)
        self.tp_size = int(getattr(vllm_config.parallel_config, "tensor_parallel_size", 1) or 1)
        self.control: ControlServer | None = None
        if settings.control_port >= 0:  # 0: a free port
            self.control = ControlServer(
                settings.bind_host,
                settings.control_port,
                release=self.release,
                arm=self.arm_migration,
                collect=self.collect_migration,
                stats=self.stats_json,
                metrics=self.stats.prometheus,
            ).start()
        self.control_port = self.control.port if self.control is not None else 0
        logger.info(
            "PDConnector scheduler side: engine %s, advertised %s, zmq %s, control %s, "
            "idle waits %s, layout %s",
            engine_id,
            self.host,
            settings.zmq_port or "free ports",
            self.control_port or "off",
            "interruptible" if self.waiter.sees_requests else "short",
            self.layout,
        )

    # ------------------------------------------------------------ D side

    def _target_tokens(self, request: Request) -> int:
        params = request.kv_transfer_params
        return min(int(params[kv.REMOTE_NUM_TOKENS]), len(request.prompt_token_ids or ()))

    def _usable(self, request: Request) -> bool:
        """Params well formed and layouts compatible; logs the reason once if not."""
        params = request.kv_transfer_params
        prompt_len = len(request.prompt_token_ids or ())
        reason = kv.problem(params, prompt_len, self.block_size)
        if reason is None:
            mismatch = spec_mismatch(self.layout, params[kv.LAYOUT])
            reason = mismatch and f"layout mismatch ({mismatch})"
        if reason and request.request_id not in self._warned:
            self._warned.add(request.request_id)
            logger.warning(
                "PDConnector: not pulling KV for %s from %r: %s; recomputing the prompt",
                request.request_id,
                params.get(kv.REMOTE_HOST),
                reason,
            )
        return reason is None

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int, bool]:
        params = request.kv_transfer_params
        key = kv.migration_key(params)
        if key:  # the proxy may move it elsewhere later
            self.migrations.started(key, request.request_id)
        if not kv.is_remote_prefill(params) or request.request_id in self._handled:
            return 0, False
        if not self._usable(request):
            return 0, False
        count = self._target_tokens(request) - num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        params = request.kv_transfer_params
        rid = request.request_id
        if not kv.is_remote_prefill(params) or rid in self._handled:
            return
        self._handled.add(rid)  # vLLM calls this again after the load: act only once
        if num_external_tokens <= 0:
            self._notice(request)
            return
        target = self._target_tokens(request)
        local_all = blocks.get_block_ids()[0]
        try:
            remote, local = blocks_to_load(
                params[kv.REMOTE_BLOCK_IDS],
                local_all,
                target - num_external_tokens,
                target,
                self.block_size,
            )
        except ValueError as exc:  # unreachable after _usable; fail the load, don't hang it
            logger.error("PDConnector: cannot map blocks of %s: %s", rid, exc)
            first = (target - num_external_tokens) // self.block_size
            remote, local = [], local_all[first : -(-target // self.block_size)]
        self._meta.pulls.append(
            PullSpec(
                req_id=rid,
                transfer_id=params[kv.TRANSFER_ID],
                host=params[kv.REMOTE_HOST],
                port=int(params[kv.REMOTE_PORT]),
                remote_block_ids=tuple(remote),
                local_block_ids=tuple(local),
                remote_layout=params[kv.LAYOUT],
                consumer_key=self._consumer_key(rid),
                remote_engine_id=str(params[kv.REMOTE_ENGINE_ID]),
                ports=kv.rank_ports(params),
            )
        )
        self._pulling[rid] = time.monotonic()
        self.stats.inc("pulls_started")

    def _consumer_key(self, req_id: str) -> str:
        return f"{self.engine_id}/{req_id}"

    def _notice(self, request: Request) -> None:
        """This request will not pull: let P count its consumer as done."""
        params = request.kv_transfer_params
        if kv.problem(params, 0, self.block_size):
            return  # nowhere sensible to send it
        self._meta.notices.append(
            Notice(
                transfer_id=params[kv.TRANSFER_ID],
                host=params[kv.REMOTE_HOST],
                port=int(params[kv.REMOTE_PORT]),
                consumer_key=self._consumer_key(request.request_id),
                ports=kv.rank_ports(params),
            )
        )
        self.stats.inc("pulls_skipped")

    # ------------------------------------------------------------ P side

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        from vllm.v1.request import RequestStatus

        params = request.kv_transfer_params
        rid = request.request_id
        pulled = kv.is_remote_prefill(params)
        if pulled:  # a decode request ends (normally or aborted)
            if rid not in self._handled:
                self._notice(request)  # aborted before it was ever scheduled
            self._handled.discard(rid)
            self._warned.discard(rid)
        finished_normally = request.status in (
            RequestStatus.FINISHED_LENGTH_CAPPED,
            RequestStatus.FINISHED_STOPPED,
        )
        key = kv.migration_key(params)
        armed = self.migrations.ended(key) if key else None
        if armed is not None:  # the proxy is moving this request to another engine
            return self._migrate(request, block_ids, key, armed, finished_normally)
        if pulled or not kv.wants_hold(params):
            return False, None
        prompt_len = request.num_prompt_tokens
        if not finished_normally or request.num_computed_tokens < prompt_len or not block_ids:
            logger.info(
                "PDConnector: not holding blocks of %s (status %s, %d/%d computed)",
                rid,
                request.status,
                request.num_computed_tokens,
                prompt_len,
            )
            return False, None
        # Only the blocks holding prompt tokens travel (the sampled token has no KV yet).
        answer = self._hold(
            rid, block_ids, prompt_len, kv.requested_lease(params), kv.requested_consumers(params)
        )
        return (True, answer) if answer else (False, None)

    def _migrate(
        self, request: Request, block_ids: list[int], key: str, armed: Any, normal: bool
    ) -> tuple[bool, dict[str, Any] | None]:
        """An armed request ended: hold its KV for the engine it moves to, and tell the
        proxy (which collects the outcome from the control plane)."""
        rid = request.request_id
        tokens = request.num_computed_tokens  # tokens whose KV is in the blocks
        answer = None
        if normal:
            outcome: dict[str, Any] = {"outcome": "finished", "reason": str(request.status)}
        elif rid in self._pulling:
            # Its own pull still writes those blocks, and vLLM frees them when the pull
            # reports: holding them too would report the request finished twice.
            outcome = {"outcome": "not_held", "reason": "KV still loading"}
        elif tokens <= 0 or not block_ids:
            outcome = {"outcome": "not_held", "reason": "no KV computed yet"}
        else:
            answer = self._hold(rid, block_ids, tokens, armed.lease_seconds, 1)
            if answer is None:
                outcome = {"outcome": "not_held", "reason": "ZMQ ports unknown"}
            else:
                outcome = {"outcome": "held", "kv_transfer_params": answer}
                self.stats.inc("migrations_held")
        self.migrations.record(key, outcome)
        logger.info("PDConnector: request %s migrating (%s): %s", rid, key, outcome["outcome"])
        return (True, answer) if answer else (False, None)

    def _hold(
        self,
        rid: str,
        block_ids: list[int],
        tokens: int,
        lease_seconds: float | None,
        consumers: int,
    ) -> dict[str, Any] | None:
        """Hold the blocks of a request's first ``tokens`` tokens for pulls; the params
        that name them (None when the workers' ports are not known yet)."""
        ports = self.zmq_ports()
        if not ports:
            logger.warning(
                "PDConnector: not holding blocks of %s: the workers' ZMQ ports are unknown", rid
            )
            return None
        held = list(block_ids[: -(-tokens // self.block_size)])
        tid = uuid.uuid4().hex
        self.leases.add(tid, rid, lease_seconds)
        self._meta.sends.append(SendSpec(tid, rid, tuple(held), consumers))
        self.stats.inc("transfers_held_total")
        return kv.held_params(
            tid, self.engine_id, self.host, ports, self.control_port, held, tokens, self.layout
        )

    # ------------------------------------------------------------ control plane

    def arm_migration(self, key: str, lease_seconds: float | None) -> bool:
        """Control plane: hold this request's KV when it ends (the proxy ends it)."""
        return self.migrations.arm(key, lease_seconds)

    def collect_migration(self, key: str, wait_seconds: float) -> dict[str, Any] | None:
        # One control-plane thread waits at most 30 s; a caller that will wait longer
        # asks again while the answer is "pending".
        return self.migrations.collect(key, min(wait_seconds, 30.0))

    def zmq_ports(self) -> list[int]:
        """The ZMQ port of each TP rank's server (the workers report the ports they
        bound); empty while unknown."""
        if self.wake_listener is not None:
            reported = self.wake_listener.ports
            if all(rank in reported for rank in range(self.tp_size)):
                return [reported[rank] for rank in range(self.tp_size)]
        if self.settings.zmq_port:
            return [self.settings.zmq_port + rank for rank in range(self.tp_size)]
        return []

    def release(self, transfer_id: str) -> bool:
        """Control plane (its own thread): stop holding a transfer's blocks next step."""
        released = self.leases.release(transfer_id)
        if released:
            self.stats.inc("releases")
            self.waiter.wake()  # an idle engine tells its workers now
        return released

    # ------------------------------------------------------------ every step

    def build_connector_meta(self, scheduler_output: Any) -> PDConnectorMetadata:
        for tid in self.leases.expire():
            self.stats.inc("lease_expiries")
            logger.info("PDConnector: lease of transfer %s expired; releasing its blocks", tid)
        meta, self._meta = self._meta, PDConnectorMetadata()
        meta.releases.extend(self.leases.take_releases())
        self._sync_gauges()
        # Holding blocks or waiting for a pull keeps the engine stepping with nothing
        # to compute: wait for something to happen instead (see engine_ext.idle).
        if (
            self.settings.idle_step_sleep_ms
            and meta.is_empty()
            and not workers_have_news(scheduler_output)
            and (len(self.leases) or self._pulling)
        ):
            timeout = self.idle_timeout()
            if timeout > 0:
                self.waiter.wait(timeout)
        return meta

    def idle_timeout(self) -> float:
        """How long an idle step may block (0: not at all).

        * Not at all while workers announced a transfer that no step has reported yet:
          the news may sit in an earlier step's output that the engine reads only
          after this step is scheduled (async scheduling pipelines steps).
        * ``idle_step_sleep_ms`` while a request here waits for its KV, or where
          nothing can wake us (no input queue, no wake channel, other requests
          waiting for something else): a lost wake-up then costs a request no more.
        * Otherwise, with blocks merely held for others, until the next lease expiry
          (at most IDLE_WAIT_MAX_SECONDS); a request, a release or news ends it.
        """
        listener = self.wake_listener
        if listener is not None and listener.has_pending():
            return 0.0
        short = self.settings.idle_step_sleep_ms / 1000.0
        if (
            self._pulling
            or not self.waiter.sees_requests
            or self._vllm_scheduler is None
            or listener is None
            or not listener.ready
        ):
            return short
        try:
            others = self._vllm_scheduler.get_num_unfinished_requests() > 0
        except Exception:  # noqa: BLE001 - vLLM internals: if in doubt, wait briefly
            others = True
        if others:  # e.g. a request waiting for its grammar: nothing would wake us for it
            return short
        timeout = IDLE_WAIT_MAX_SECONDS
        deadline = self.leases.next_deadline()
        if deadline is not None:
            timeout = min(timeout, max(0.0, deadline - time.monotonic()))
        return timeout

    def update_connector_output(self, output: KVConnectorOutput) -> None:
        if output.kv_connector_stats is not None:
            self.stats.add(output.kv_connector_stats.data)
        if self.wake_listener is not None:
            self.wake_listener.seen(SEND, output.finished_sending or ())
            self.wake_listener.seen(RECV, output.finished_recving or ())
        for rid in output.finished_sending or ():
            lease = self.leases.finished(rid)
            if lease is not None and not lease.releasing:
                self.stats.inc("transfers_completed")
        for rid in output.finished_recving or ():
            started = self._pulling.pop(rid, None)
            if started is not None:
                self.stats.inc("kv_wait_seconds_total", time.monotonic() - started)
        self._sync_gauges()

    def _sync_gauges(self) -> None:
        self.stats.set_gauge("transfers_held", len(self.leases))
        self.stats.set_gauge("pulls_inflight", len(self._pulling))

    def stats_json(self) -> dict[str, Any]:
        return {"engine_id": self.engine_id, **self.stats.snapshot()}

    def shutdown(self) -> None:
        if self.control is not None:
            self.control.stop()
            self.control = None
        if self.wake_listener is not None:
            self.wake_listener.stop()
            self.wake_listener = None
