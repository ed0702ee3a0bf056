"""One client's episode on the server, and the pool of loaded policies sessions draw from (no networking here).

A ``Session`` owns one runtime policy for the lifetime of its connection (its own cache and noise RNG) and
turns one request frame into one reply frame. Calls into a session are serialised by its connection handler;
``Session.handle`` additionally refuses concurrent calls loudly.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from par_deploy.errors import ParError
from par_deploy.files import sha256_file
from par_deploy.runtime.bundle import MANIFEST_FILE, open_bundle
from par_deploy.serve import protocol

if TYPE_CHECKING:
    from par_deploy.runtime import BundlePolicy

log = logging.getLogger("par_deploy.serve")


class Session:
    """Decode a request, run it on this connection's policy, encode the reply (with server timing)."""

    def __init__(self, policy: BundlePolicy, max_array_bytes: int):
        self.policy = policy
        self.max_array_bytes = max_array_bytes
        self._busy = threading.Lock()

    def handle(self, frame: bytes | str) -> bytes:
        t0 = time.perf_counter()
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("Session.handle called concurrently; one request at a time per connection")
        try:
            compute_ms = 0.0
            try:
                reply, compute_ms = self._dispatch(protocol.unpack(frame))
            except Exception as e:  # every failure goes back to this client; the server keeps running
                if isinstance(e, ParError | ValueError | TypeError | RuntimeError):
                    log.info("request refused: %s: %s", type(e).__name__, e)
                else:
                    log.exception("request failed")
                reply = protocol.error_reply(e)
            left = self.policy.steps_left
            reply["steps_left"] = None if left == float("inf") else left  # None: a sliding cache never fills
            reply["timing"] = {"compute_ms": compute_ms, "server_ms": (time.perf_counter() - t0) * 1e3}
            return protocol.pack(reply)
        finally:
            self._busy.release()

    def _dispatch(self, msg: dict[str, Any]) -> tuple[dict[str, Any], float]:
        op = msg.get("op")
        if op == "reset":
            instruction, seed = protocol.parse_reset(msg)
            t = time.perf_counter()
            self.policy.reset(instruction, seed=seed)
            return {"ok": True}, (time.perf_counter() - t) * 1e3
        if op == "act":
            obs, noise, executed = protocol.parse_act(msg, self.max_array_bytes)
            t = time.perf_counter()
            actions = self.policy.act(obs, noise=noise, executed=executed)  # [L, A] float32
            compute_ms = (time.perf_counter() - t) * 1e3
            return {"ok": True, "actions": protocol.encode_array(actions, "actions")}, compute_ms
        raise protocol.ProtocolError(f"unknown op {op!r}; expected 'reset' or 'act'")


class PolicyPool:
    """Fresh policies for new connections: ``size`` are loaded ahead, a connection takes one and never gives it
    back (the next client gets a policy in exactly the state ``runtime.load`` returns), and the pool refills in
    the background. ``load`` is blocking and runs in a worker thread."""

    def __init__(self, load: Callable[[], BundlePolicy], size: int = 1):
        self._load, self.size = load, max(0, size)
        self._idle: list[BundlePolicy] = []
        self._pending: set[asyncio.Task] = set()

    async def fill(self) -> None:
        while len(self._idle) < self.size:
            self._idle.append(await asyncio.to_thread(self._load))

    async def acquire(self) -> BundlePolicy:
        policy = self._idle.pop() if self._idle else await asyncio.to_thread(self._load)
        self._refill()
        return policy

    def _refill(self) -> None:
        if len(self._idle) + len(self._pending) >= self.size:
            return
        task = asyncio.create_task(asyncio.to_thread(self._load))
        self._pending.add(task)
        task.add_done_callback(self._loaded)

    def _loaded(self, task: asyncio.Task) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is None:
            self._idle.append(task.result())
        elif not task.cancelled():
            log.error("loading a policy for the pool failed: %s", task.exception())


def describe_bundle(bundle_dir: str | Path, backend: str) -> dict[str, Any]:
    """The hello message for a bundle (verifies the bundle's files for ``backend`` once)."""
    bundle = open_bundle(bundle_dir, backend)
    spec = bundle.spec
    return {
        "type": "hello",
        "protocol": protocol.PROTOCOL_VERSION,
        "spec": protocol.spec_to_dict(spec),
        "backend": backend,
        "bundle_hash": sha256_file(Path(bundle_dir) / MANIFEST_FILE),
        "denoise_steps": bundle.steps,
        "noise_shape": [bundle.steps + 1, spec.chunk_len, spec.action_dim],
        "checkpoint_hash": bundle.manifest["checkpoint_hash"],
        "precision": bundle.precision,
        "sampler": bundle.manifest["sampler"]["kind"],
        # what the policy was trained for (evaluation checks the task and the controller against these)
        "task": bundle.config.task_info.task,
        "control_mode": bundle.config.task_info.control_mode,
    }


def max_array_bytes(hello: dict[str, Any]) -> int:
    """The largest array a request may carry: the bigger of the image and the noise, in float64 (a wrong dtype
    still reaches the policy, which names the expected one)."""
    s = hello["spec"]
    image = s["num_cameras"] * s["image_size"] ** 2 * 3 * 8
    noise = 8 * hello["noise_shape"][0] * hello["noise_shape"][1] * hello["noise_shape"][2]
    return max(image, noise, 8 * s["state_dim"], 1024)


def max_message_bytes(hello: dict[str, Any]) -> int:
    """The largest request frame the server accepts: two maximal arrays plus 64 KiB of fields."""
    return 2 * max_array_bytes(hello) + 65536
