"""The Ray back end: sessions served by `CanvasWorker` replicas on Ray Serve.

Two tiers.  The Gradio app stays one CPU process (page, API, recordings,
exports) and holds a `RayRenderer`, which talks to the `CanvasWorker`
deployment through a `DeploymentHandle`.  Each replica holds one GPU, one
engine and one `InProcessRenderer` (made by `ui.renderer.local_renderer`,
as the app's own), which schedules the replica's sessions; Gradio never
runs in a replica.

Pinning.  A session's bank lives on one replica, so every frame of it must
reach that replica.  Each call is routed by the session id with Ray Serve's
model multiplexing (`handle.options(multiplexed_model_id=session_id)`); the
replica's multiplexed loader (`_slot`) makes room for the session lazily
(the stream itself is made by its first frame) and its eviction frees it.
Ray's router prefers replicas that report the id, and learns that a replica
holds a new id a moment after it was loaded (the replica reports it every
0.1 s through the controller); requests sent before that may go anywhere.
So `RayRenderer.open` loads the session, then probes (`where`, which loads
nothing) until the router sends the session to its owner, and opens one
session at a time, so that each new session is placed by up-to-date
counts (the router sends an unknown id to the replica with the fewest).  The router also sends a
request elsewhere when the owner has `max_ongoing_requests` requests
running: each session has at most one request in flight (newest frame
wins, ui.mailbox), so `max_ongoing_requests` = the session cap + a margin
for opens and probes means that never happens.

Room.  A replica takes at most `max_sessions` sessions, fewer where its GPU
memory holds fewer streams (`ui.renderer.memory_cap`).  A new session that
reaches a full replica gets `RendererBusy` (the router tried the replica
with the fewest sessions, so every replica is full); active sessions are
never evicted for newcomers, only sessions idle for `idle_timeout`.  Closing a session
frees its stream and its room at once (and the router's count).

Failover.  A step carries its frame and settings (seed included) and the
epoch of the stream it continues.  When the replica died, or it no longer
holds that stream (evicted, restarted), the client retries once with
`restart`: the router sends it to a live replica, which warm-starts a fresh
stream from this frame under a new epoch.  The app sees the new epoch
("render restarted"); it keeps every recorded frame, which never left it.

Ray is optional: nothing here is imported unless the app runs with `--ray`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import ray
import torch
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

from sv2v_core.config import StreamConfig
from sv2v_core.images import resize
from sv2v_core.loader import EngineOptions, load_engine
from sv2v_core.video import read_video

from .local_renderer import MAX_BATCH, local_renderer
from .mailbox import Mailbox, supersede
from .renderer import RendererBusy, RendererClosed, RenderStats, SessionLost, StepReply, StepRequest
from .settings import served_variants

APP_NAME = "sv2v-canvas"
# Ray's multiplexer evicts least-recently-used sessions past this; the
# replica's own cap (at most this) keeps it from ever doing so.
MAX_SLOTS = 256
# Requests a replica may run besides one per session: opens and probes.
REQUEST_MARGIN = 8
ROUTING_PROBES = 3          # consecutive probes that must reach the owner
# A replica reports its sessions every 0.1 s, through the controller, to the
# routers: trust no probe before this long after an open.
ROUTING_SETTLE_SECONDS = 0.3
# A new session refused as busy is asked again after these pauses before the
# app shows the busy state (the counts the router placed it by may be stale).
BUSY_RETRIES = (0.3, 0.6, 1.2)
ROUTING_WAIT_SECONDS = 5.0  # give up waiting for the router after this (the step still works, maybe elsewhere)
PROBE_INTERVAL = 0.05
CALL_TIMEOUT = 120.0        # a step that takes longer than this has a dead worker behind it
WORKER_DIED = (RayActorError, ActorDiedError, ActorUnavailableError)

log = logging.getLogger("sv2v.ray")


@dataclass(frozen=True)
class WorkerOptions:
    """What each replica loads and how many sessions it takes.

    model, vae, lora, controlnet: as the app's --model/--vae/--lora/--controlnet
        ("tiny": the built-in ones), loaded by sv2v_core.loader as the app loads
        its own (a model that cannot be loaded falls back to 'tiny'; a
        ControlNet that cannot be loaded fails the replica's start, loudly).
    base: the canvas's stream settings (size, mode), for the memory cap.
    max_sessions: at most this many sessions per replica (fewer if its GPU
        memory holds fewer streams).
    max_batch: frames the replica renders together in one model call.
    torch_threads: CPU threads for torch in the replica (None: Ray's default).
    compile: the serving choice, as the app's --compile (sv2v_core.loader.choose_serving).
    """

    model: str = "tiny"
    vae: str | None = None
    lora: str | None = None
    controlnet: str | None = None
    base: StreamConfig = StreamConfig(width=256, height=256, mode="latency", similarity_skip=None)
    max_sessions: int = 8
    max_batch: int = MAX_BATCH
    idle_timeout: float = 1800.0
    torch_threads: int | None = None
    compile: str = "auto"

    def __post_init__(self) -> None:
        if not 1 <= self.max_sessions <= MAX_SLOTS:
            raise ValueError(f"max_sessions must be between 1 and {MAX_SLOTS}, got {self.max_sessions}")


def load_worker_engine(options: WorkerOptions):
    """The replica's engine: the model on its GPU (or on a CPU), made for serving as the app's own
    (the fast path and the serving choice)."""
    loaded = load_engine(EngineOptions(model=options.model, vae=options.vae, lora=options.lora,
                                       controlnet=options.controlnet, fallback=True, serving=True,
                                       compile=options.compile))
    if loaded.fell_back:
        log.warning("%s", loaded.fell_back)
    log.info("serving: %s", loaded.serving.why)
    return loaded.engine


class _Slot:
    """A session's entry in the replica's multiplexer: evicting it frees the session's stream."""

    def __init__(self, worker: "CanvasWorker", session_id: str, epoch: str | None) -> None:
        self.worker = worker
        self.session_id = session_id
        self.epoch = epoch
        self.live = True

    def __del__(self) -> None:  # Ray's multiplexer calls this when it evicts the session
        if self.live:
            self.live = False
            self.worker.evicted(self)


@serve.deployment(name="CanvasWorker", ray_actor_options={"num_gpus": 1})
class CanvasWorker:
    """One replica: one engine, one in-process renderer over its sessions."""

    def __init__(self, options: WorkerOptions) -> None:
        if options.torch_threads:
            torch.set_num_threads(options.torch_threads)
        self.options = options
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.engine = load_worker_engine(options)
        self.renderer = local_renderer(self.engine, max_sessions=options.max_sessions,
                                       idle_timeout=options.idle_timeout, worker=self.replica, base=options.base,
                                       max_batch=options.max_batch)
        self.renderer.warm_up(served_variants(options.base, controlled=self.renderer.controlled))
        self.served = 0

    @serve.multiplexed(max_num_models_per_replica=MAX_SLOTS)
    async def _slot(self, session_id: str) -> _Slot:
        self.renderer.open(session_id)  # RendererBusy when full: then Ray registers nothing
        return _Slot(self, session_id, self.renderer.epoch_of(session_id))

    def evicted(self, slot: _Slot) -> None:
        if self.renderer.epoch_of(slot.session_id) == slot.epoch:
            self.renderer.close(slot.session_id)

    def _forget(self, session_id: str) -> None:
        """Take a freed session out of the multiplexer, so the router stops counting it here.

        Ray Serve has no public call to unload one multiplexed id; its
        wrapper (an attribute of this object) is changed here, by the two
        fields its own LRU eviction changes.  ray is pinned in
        requirements-ray.txt; tests/test_ray.py checks the count.
        """
        wrapper = getattr(self, "__serve_multiplex_wrapper", None)
        if wrapper is None:
            return
        slot = wrapper.models.pop(session_id, None)
        if slot is not None:
            slot.live = False
            wrapper._push_multiplexed_replica_info = True

    def _forget_reclaimed(self) -> None:
        """Forget sessions the renderer reclaimed (idle) on its own."""
        wrapper = getattr(self, "__serve_multiplex_wrapper", None)
        for session_id in [] if wrapper is None else list(wrapper.models):
            if not self.renderer.holds(session_id):
                self._forget(session_id)

    async def _admit(self, session_id: str) -> None:
        if not self.renderer.holds(session_id):
            self.renderer.open(session_id)  # RendererBusy before Ray registers anything
        await self._slot(session_id)
        self._forget_reclaimed()

    # -- the app's calls (each routed by its session id) -------------------------------
    async def open(self) -> str:
        """Make room for the session; this replica's id.  RendererBusy when full."""
        await self._admit(serve.get_multiplexed_model_id())
        return self.replica

    async def where(self) -> tuple[str, bool]:
        """This replica's id and whether it holds the session (loads nothing)."""
        return self.replica, self.renderer.holds(serve.get_multiplexed_model_id())

    async def step(self, request: StepRequest) -> StepReply:
        session_id = serve.get_multiplexed_model_id()
        if not self.renderer.holds(session_id) and request.epoch is not None and not request.restart:
            raise SessionLost(f"session {session_id} has no stream on replica {self.replica}")
        await self._admit(session_id)
        try:
            reply = await asyncio.wrap_future(self.renderer.step(session_id, request))
        except SessionLost:  # it held another stream of the session: dropped as stale
            self._forget(session_id)
            raise
        self.served += 1
        return reply

    async def release(self) -> None:
        """The session is idle: its stream leaves the GPU (its next frame brings it back)."""
        self.renderer.release(serve.get_multiplexed_model_id())

    async def reset(self) -> bool:
        return await asyncio.wrap_future(self.renderer.reset(serve.get_multiplexed_model_id()))

    async def close(self) -> None:
        session_id = serve.get_multiplexed_model_id()
        self.renderer.close(session_id)
        self._forget(session_id)

    async def stats(self) -> dict:
        """This replica's id, sessions, cap and frames served (for tests and the benchmark)."""
        return {"replica": self.replica, "sessions": self.renderer.sessions(),
                "max_sessions": self.renderer.max_sessions, "served": self.served,
                "batches": self.renderer.stats().batches,
                "size_multiple": self.engine.size_multiple, "builtin": self.engine.components.builtin,
                "controlled": self.renderer.controlled}

    def __del__(self) -> None:  # Serve calls it when the replica shuts down
        renderer = getattr(self, "renderer", None)
        if renderer is not None:
            renderer.shutdown()


@dataclass
class _Lane:
    """One session on the client: its stream's epoch and owner, and whether a call of it is in flight
    (its frame that runs next waits in the renderer's mailbox)."""

    session_id: str
    opened: bool = False
    owner: str | None = None
    epoch: str | None = None
    routed: bool = False          # the router is known to send this session to its owner
    running: bool = False         # a call of this session is in flight
    cut_pending: bool = False


@dataclass
class _Waiting:
    """A frame waiting for its session's call in flight to end."""

    request: StepRequest
    future: Future


class RayRenderer:
    """The app's side of the Ray back end (implements ui.renderer.Renderer).

    Calls of one session run one at a time, in order, on a thread pool; a
    frame submitted while another of its session is in flight waits, and a
    newer one replaces it (`Superseded`; ui.mailbox).
    """

    def __init__(self, handle, *, threads: int = 64) -> None:
        self.name = "ray"
        self.handle = handle
        stats = handle.stats.remote().result(timeout_s=CALL_TIMEOUT)
        self.size_multiple = stats["size_multiple"]  # render sides must be multiples of it
        self.builtin = stats["builtin"]              # the replicas run a built-in model (not art)
        self.controlled = stats["controlled"]        # the replicas' model has a ControlNet
        self._lanes: dict[str, _Lane] = {}
        self._lock = threading.Lock()
        self._steps = threading.Lock()  # guards the mailbox, the lanes' running and cut flags, the counts
        self._waiting: Mailbox[_Waiting] = Mailbox()
        self._counts = dict(submitted=0, rendered=0, dropped=0, failed=0)
        self._opening = threading.Lock()  # one open at a time: each is placed by up-to-date counts
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sv2v-ray")
        self._closed = False

    def _session(self, session_id: str):
        return self.handle.options(multiplexed_model_id=session_id)

    def _call(self, session_id: str, method: str, *args):
        """Call a replica method for the session and wait; the replica's own error as it was raised."""
        try:
            return getattr(self._session(session_id), method).remote(*args).result(timeout_s=CALL_TIMEOUT)
        except RayTaskError as error:  # carries the replica's traceback in its text: raise what it wraps
            cause = error.cause
            if isinstance(cause, Exception) and not isinstance(cause, RayTaskError):
                raise cause from None
            raise

    def _lane(self, session_id: str) -> _Lane:
        if not session_id:
            raise ValueError("a session needs an id")
        with self._lock:
            if self._closed:
                raise RendererClosed("the app is shutting down")
            return self._lanes.setdefault(session_id, _Lane(session_id))

    # -- room -----------------------------------------------------------------------------
    def open(self, session_id: str) -> None:
        lane = self._lane(session_id)
        if lane.opened:
            return
        with self._opening:
            if lane.opened:
                return
            for delay in BUSY_RETRIES:
                try:
                    lane.owner = self._call(session_id, "open")
                    break
                except RendererBusy:
                    # The router places a new session on the replica it counts fewest
                    # sessions on; a count a moment old (a busy controller) may have
                    # picked a full one while another has room: ask again a little later.
                    time.sleep(delay)
            else:
                lane.owner = self._call(session_id, "open")  # every replica full: RendererBusy
            lane.opened = True
            self._await_routing(lane)

    def _await_routing(self, lane: _Lane) -> None:
        """Probe until the router sends the session to its owner a few times in a row."""
        deadline = time.monotonic() + ROUTING_WAIT_SECONDS
        time.sleep(ROUTING_SETTLE_SECONDS)
        hits = 0
        while hits < ROUTING_PROBES and time.monotonic() < deadline:
            replica, _ = self._call(lane.session_id, "where")
            hits = hits + 1 if replica == lane.owner else 0
            if hits < ROUTING_PROBES:
                time.sleep(PROBE_INTERVAL)
        lane.routed = hits >= ROUTING_PROBES
        if not lane.routed:
            log.warning("the router does not send session %s to its replica %s yet", lane.session_id, lane.owner)

    def sessions(self) -> int:
        with self._lock:
            return sum(lane.opened for lane in self._lanes.values())

    def owner(self, session_id: str) -> str | None:
        """The replica holding the session's stream (None: not opened)."""
        with self._lock:
            lane = self._lanes.get(session_id)
        return None if lane is None else lane.owner

    # -- per session ------------------------------------------------------------------------
    def step(self, session_id: str, request: StepRequest) -> Future:
        lane = self._lane(session_id)
        future: Future = Future()
        with self._steps:
            lane.cut_pending = lane.cut_pending or request.cut
            self._counts["submitted"] += 1
            if lane.running:
                replaced = self._waiting.put(session_id, _Waiting(request, future))
                self._counts["dropped"] += replaced is not None
            else:
                lane.running, replaced = True, None
                self._pool.submit(self._pump, lane, request, future)
        supersede([replaced], f"a newer frame of session {session_id} replaced this one")
        return future

    def _pump(self, lane: _Lane, request: StepRequest, future: Future) -> None:
        """Run the lane's frames, newest waiting one next, until none waits."""
        while True:
            outcome = None
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(self._render(lane, request))
                    outcome = "rendered"
                except Exception as error:  # noqa: BLE001 - not swallowed: it goes to whoever waits on the future
                    future.set_exception(error)
                    outcome = "failed"
            with self._steps:
                if outcome is not None:
                    self._counts[outcome] += 1
                waiting = self._waiting.take(lane.session_id)
                if waiting is None:
                    lane.running = False
                    return
            request, future = waiting.request, waiting.future

    def _render(self, lane: _Lane, request: StepRequest) -> StepReply:
        self.open(lane.session_id)
        if not lane.routed:
            self._await_routing(lane)
        with self._steps:
            cut, lane.cut_pending = lane.cut_pending, False
        request = dataclasses.replace(request, cut=cut, epoch=lane.epoch, restart=False)
        try:
            reply = self._call(lane.session_id, "step", request)
        except (SessionLost, *WORKER_DIED) as error:
            # Retry once: a live replica warm-starts a fresh stream from this frame.
            log.warning("session %s lost its stream (%s): restarting it", lane.session_id, type(error).__name__)
            reply = self._call(lane.session_id, "step", dataclasses.replace(request, restart=True))
        if reply.worker != lane.owner:  # warm-started elsewhere: make sure the next frame follows it
            lane.owner, lane.routed = reply.worker, False
        lane.epoch = reply.epoch
        return reply

    def reset(self, session_id: str) -> Future:
        lane = self._lane(session_id)
        if not lane.opened:
            done: Future = Future()
            done.set_result(False)
            return done
        return self._pool.submit(self._call, session_id, "reset")

    def release(self, session_id: str) -> None:
        with self._lock:
            lane = self._lanes.get(session_id)
        if lane is not None and lane.opened:
            self._session(session_id).release.remote()  # nothing to wait for

    def cancel(self, session_id: str) -> None:
        with self._lock:
            lane = self._lanes.get(session_id)
        if lane is not None:
            self._drop_waiting(lane, "its page went away")

    def _drop_waiting(self, lane: _Lane, why: str) -> None:
        with self._steps:
            waiting = self._waiting.take(lane.session_id)
            self._counts["dropped"] += waiting is not None
        supersede([waiting], f"session {lane.session_id}: {why} before this frame ran")

    def close(self, session_id: str) -> None:
        with self._lock:
            lane = self._lanes.pop(session_id, None)
        if lane is None:
            return
        self._drop_waiting(lane, "closed")
        if lane.opened:
            try:
                self._call(session_id, "close")
            except WORKER_DIED:
                pass  # its replica is gone, and the stream with it

    def warm_up(self, configs: Sequence[StreamConfig]) -> None:
        """Nothing: each replica warms itself up when it starts, for the page's settings (`WorkerOptions`)."""

    def translate(self, source: str, config: StreamConfig, max_frames: int) -> Iterator[np.ndarray]:
        """A video's frames as the steps of a session of its own, in latency mode (a step returns one
        render), on whichever replica has room."""
        config = config.replace(mode="latency")
        session_id = f"video-{uuid.uuid4().hex}"
        frames, _ = read_video(source)
        try:
            for _, frame in zip(range(max_frames), frames):
                frame = resize(frame, config.width, config.height)
                yield self.step(session_id, StepRequest(frame, config)).result().image
        finally:
            self.close(session_id)

    def stats(self) -> RenderStats:
        """This client's counts of frames (the model's busy time and batch sizes are the replicas':
        `replica_stats`)."""
        with self._steps:
            return RenderStats(**self._counts)

    def replica_stats(self, replicas: int, attempts: int = 64) -> list[dict]:
        """Stats of `replicas` replicas (plain calls, which the router spreads, until each answered)."""
        seen: dict[str, dict] = {}
        for _ in range(attempts):
            stats = self.handle.stats.remote().result(timeout_s=CALL_TIMEOUT)
            seen[stats["replica"]] = stats
            if len(seen) >= replicas:
                break
        return sorted(seen.values(), key=lambda stats: stats["replica"])

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            lanes = list(self._lanes)
        for session_id in lanes:
            self.close(session_id)
        self._pool.shutdown(wait=True)


def deploy(options: WorkerOptions, *, replicas: int | None = None, gpus_per_replica: float = 1.0,
           cpus_per_replica: float = 1.0, name: str = APP_NAME) -> RayRenderer:
    """Run the CanvasWorker deployment on the connected Ray cluster; its client.

    replicas: None means one per GPU in the cluster.  A cluster without GPUs
    gets CPU replicas (one, unless `replicas` says more): a demo, not real time.
    """
    gpus = ray.cluster_resources().get("GPU", 0)
    if not gpus:
        log.warning("the Ray cluster has no GPU: the replicas render on CPUs")
        gpus_per_replica = 0.0
    if replicas is None:
        replicas = max(1, int(gpus // gpus_per_replica)) if gpus_per_replica else 1
    app = CanvasWorker.options(
        num_replicas=replicas,
        max_ongoing_requests=options.max_sessions + REQUEST_MARGIN,
        ray_actor_options={"num_gpus": gpus_per_replica, "num_cpus": cpus_per_replica},
    ).bind(options)
    log.info("starting %d CanvasWorker replica(s) of %s", replicas, options.model)
    return RayRenderer(serve.run(app, name=name, route_prefix=None))


def connect(address: str) -> None:
    """Join the Ray cluster at `address` ("auto": the one this host joined; "local": start one here)."""
    ray.init(address=None if address == "local" else address, log_to_driver=False)


__all__ = ["CanvasWorker", "RayRenderer", "RendererBusy", "WorkerOptions", "connect", "deploy"]
