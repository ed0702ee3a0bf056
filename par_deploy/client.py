"""A thin client for ``par-deploy serve``: numpy, msgpack and websockets only (never torch or onnxruntime).

``RemotePolicy(url)`` has the public interface of the in-process ``par_deploy.runtime.Policy``, so code written
against an engine runs against a server unchanged::

    from par_deploy.client import RemotePolicy
    with RemotePolicy("ws://gpu-box:8000") as policy:
        policy.reset("push the cube to the goal region", seed=0)
        chunk = policy.act({"rgb": rgb_uint8, "state": state})   # [spec.stride, action_dim], controller units

One ``RemotePolicy`` is one connection, one episode and one KV-cache on the server. Server-side failures raise
the same par-deploy errors as the engine (``InputError``, ``CacheFullError``, ``ActionError``); an unknown
instruction raises ``InputError`` (a ``ValueError``, as in-process); ``RemoteError`` (a ``RuntimeError``) covers
the rest, e.g. ``act`` before ``reset``; ``ServerUnavailable`` (a ``ConnectionError``) a lost or silent server.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.sync.client import connect

from par_deploy.errors import InputError
from par_deploy.runtime.policy import PolicySpec
from par_deploy.serve import protocol
from par_deploy.serve.protocol import ProtocolError, RemoteError, ServerUnavailable

__all__ = ["ProtocolError", "RemoteError", "RemotePolicy", "ServerUnavailable"]

MAX_REPLY_BYTES = 1 << 20  # replies hold one [L, A] chunk; the hello a spec


class RemotePolicy:
    """A policy served by ``par-deploy serve`` at ``url`` (``ws://host:port``).

    ``timeout``: seconds to wait for connecting and for each reply; past it the connection is closed and
    ``ServerUnavailable`` raised. Not re-entrant: a call while another thread's call is in flight raises
    ``RuntimeError`` instead of interleaving two episodes' messages.
    """

    def __init__(self, url: str, timeout: float = 30.0):
        self.url, self.timeout = url, timeout
        self._lock = threading.Lock()
        try:
            self._ws = connect(url, compression=None, max_size=MAX_REPLY_BYTES, open_timeout=timeout, proxy=None)
        except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as e:
            raise ServerUnavailable(f"cannot connect to the policy server at {url} ({e})") from None
        hello = self._receive()
        if hello.get("type") != "hello" or hello.get("protocol") != protocol.PROTOCOL_VERSION:
            self.close()
            raise ProtocolError(
                f"{url}: expected a protocol {protocol.PROTOCOL_VERSION} hello, got "
                f"type {hello.get('type')!r} protocol {hello.get('protocol')!r}"
            )
        self.info: dict[str, Any] = hello  # backend, bundle_hash, denoise_steps, noise_shape, ...
        self.spec: PolicySpec = protocol.spec_from_dict(hello.get("spec"))
        self._max_message = int(hello.get("max_message_bytes", 0))
        self._steps_left: int | float = float("inf") if self.spec.overflow == "slide" else self.spec.max_blocks
        self.last_timing: dict[str, float] = {}  # server_ms, compute_ms, round_trip_ms of the last call

    # -- the runtime Policy interface ------------------------------------------------------------------
    def reset(self, instruction: str | None = None, seed: int | None = None) -> None:
        """Start a new episode on the server (clears this connection's cache)."""
        self._call(protocol.reset_request(instruction, seed))

    def act(
        self, observation: dict[str, np.ndarray], noise: np.ndarray | None = None, executed: np.ndarray | None = None
    ) -> np.ndarray:
        """observation ``{"rgb": uint8 [V, H, W, 3], "state": float32 [S]}`` -> actions float32 ``[spec.stride, A]``.

        ``noise`` and ``executed`` (float32 ``[spec.stride, A]`` in controller units: the actions executed since
        the previous call, when they differ from the ones returned) as for ``par_deploy.runtime.Policy.act``; the
        server validates them as the in-process policy does (``InputError``, nothing of the episode consumed).
        """
        reply = self._call(protocol.act_request(observation, noise, executed))
        L, A = self.spec.stride, self.spec.action_dim
        actions = protocol.decode_array(reply.get("actions"), "actions", 8 * L * A)
        if actions.shape != (L, A) or actions.dtype != np.float32 or not np.isfinite(actions).all():
            raise ProtocolError(
                f"server returned actions {actions.dtype} {actions.shape}, expected finite float32 {(L, A)}"
            )
        return actions

    @property
    def steps_left(self) -> int | float:
        """Control steps left before the server's cache is full (as of the last reply; ``inf``: sliding cache)."""
        return self._steps_left

    @property
    def denoise_steps(self) -> int:
        return int(self.info["denoise_steps"])

    def noise_shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.info["noise_shape"])

    # -- connection ------------------------------------------------------------------------------------
    def close(self) -> None:
        self._ws.close()

    def __enter__(self) -> RemotePolicy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        frame = protocol.pack(request)
        if self._max_message and len(frame) > self._max_message:
            raise InputError(f"request of {len(frame)} bytes exceeds the server's limit of {self._max_message}")
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("RemotePolicy is not re-entrant: another thread is waiting for a reply")
        try:
            t0 = time.perf_counter()
            try:
                self._ws.send(frame)
            except ConnectionClosed as e:
                raise self._closed(e) from None
            reply = self._receive()
            round_trip = (time.perf_counter() - t0) * 1e3
        finally:
            self._lock.release()
        steps_left, timing = reply.get("steps_left"), reply.get("timing")
        if isinstance(steps_left, int):
            self._steps_left = steps_left
        elif steps_left is None and self.spec.overflow == "slide":
            self._steps_left = float("inf")
        if isinstance(timing, dict):
            self.last_timing = {k: float(v) for k, v in timing.items() if isinstance(v, int | float)}
        self.last_timing["round_trip_ms"] = round_trip
        if reply.get("ok") is not True:
            protocol.raise_error(reply)
        return reply

    def _receive(self) -> dict[str, Any]:
        try:
            return protocol.unpack(self._ws.recv(timeout=self.timeout))
        except TimeoutError:
            self._ws.close()
            raise ServerUnavailable(f"{self.url}: no reply within {self.timeout} s; connection closed") from None
        except ConnectionClosed as e:
            raise self._closed(e) from None

    def _closed(self, e: ConnectionClosed) -> ServerUnavailable:
        rcvd = e.rcvd
        why = f"code {rcvd.code}: {rcvd.reason}" if rcvd is not None else "no close frame"
        return ServerUnavailable(f"{self.url}: the policy server closed the connection ({why})")
