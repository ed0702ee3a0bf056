"""``par-deploy serve``: a policy server on a compute box, a thin client on the robot.

Transport choice: websockets + msgpack with numpy arrays as raw bytes (openpi's choice), not gRPC (LeRobot's).
The client then needs two small pure-Python-wheel packages (``websockets``, ``msgpack``) instead of grpcio and
protobuf code generation; one persistent connection carries one episode, which is exactly the policy's
stateful KV-cache; an image frame is one binary message with no protobuf copy; the HTTP health check shares the
port (``process_request``). gRPC would add streaming flow control and typed schemas we do not need for one
request/reply per control step.

Per connection: a hello with the policy's spec, then ``reset``/``act`` requests answered in order, each with the
server's own timing. Every connection gets its own runtime policy (own KV-cache, own noise RNG) from a pool
loaded ahead; inference runs in a worker thread so the event loop keeps serving other clients and the health
check. A bad request gets an error reply and the connection stays usable. SIGTERM/SIGINT close every
connection (close code 1001) and exit cleanly. Protocol: ``par_deploy.serve.protocol``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import signal
import threading
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from par_deploy import runtime
from par_deploy.errors import ParError
from par_deploy.serve import protocol
from par_deploy.serve.session import PolicyPool, Session, describe_bundle, max_array_bytes, max_message_bytes

log = logging.getLogger("par_deploy.serve")


class PolicyServer:
    """Serves one bundle. ``pool_size`` policies are loaded ahead; at most ``max_clients`` connections at once
    (more are closed with code 1013 "try again later")."""

    def __init__(
        self,
        bundle_dir: str | Path,
        backend: str = "onnx",
        threads: int | None = 1,
        pool_size: int = 1,
        max_clients: int = 4,
    ):
        self.hello = describe_bundle(bundle_dir, backend)
        self.hello["max_message_bytes"] = max_message_bytes(self.hello)
        self.max_array_bytes = max_array_bytes(self.hello)
        self.pool = PolicyPool(functools.partial(runtime.load, bundle_dir, backend=backend, threads=threads), pool_size)
        self.max_clients = max_clients
        self.clients = 0
        self.port: int | None = None

    def health(self, connection: ServerConnection, request) -> Any:
        """``GET /healthz`` -> 200 and a JSON status; other paths go on to the websocket handshake."""
        if urlsplit(request.path).path != protocol.HEALTH_PATH:
            return None
        body = {
            "status": "ok",
            "clients": self.clients,
            "max_clients": self.max_clients,
            "backend": self.hello["backend"],
            "bundle_hash": self.hello["bundle_hash"],
            "protocol": protocol.PROTOCOL_VERSION,
        }
        response = connection.respond(HTTPStatus.OK, json.dumps(body) + "\n")
        del response.headers["Content-Type"]  # Headers is a multimap: assignment would add a second one
        response.headers["Content-Type"] = "application/json"
        return response

    async def handler(self, ws: ServerConnection) -> None:
        if self.clients >= self.max_clients:
            await ws.close(1013, f"server full ({self.max_clients} clients); try again later")
            return
        self.clients += 1
        try:
            await self._serve_client(ws)
        except ConnectionClosed:
            pass
        finally:
            self.clients -= 1

    async def _serve_client(self, ws: ServerConnection) -> None:
        try:
            policy = await self.pool.acquire()
        except ParError as e:
            log.error("cannot load a policy for %s: %s", ws.remote_address, e)
            await ws.close(1011, f"cannot load the policy: {e}"[:120])
            return
        session = Session(policy, self.max_array_bytes)
        await ws.send(protocol.pack(self.hello))
        log.info("client %s connected (%d active)", ws.remote_address, self.clients)
        async for frame in ws:  # one request at a time per connection: the episode is sequential
            await ws.send(await asyncio.to_thread(session.handle, frame))
        log.info("client %s disconnected", ws.remote_address)

    async def run(self, host: str, port: int, stop: asyncio.Future, on_ready=None) -> None:
        """Serve until ``stop`` completes, then close every connection and return."""
        await self.pool.fill()
        async with serve(
            self.handler,
            host,
            port,
            process_request=self.health,
            compression=None,
            max_size=self.hello["max_message_bytes"],
        ) as server:
            self.port = server.sockets[0].getsockname()[1]
            if on_ready is not None:
                on_ready(self)
            await stop
            log.info("shutting down: closing %d connection(s)", self.clients)


def run_server(
    bundle_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 0,
    backend: str = "onnx",
    threads: int | None = 1,
    pool_size: int = 1,
    max_clients: int = 4,
) -> None:
    """Blocking entry point of ``par-deploy serve``: prints the URL once listening, exits 0 on SIGTERM/SIGINT."""
    server = PolicyServer(bundle_dir, backend, threads, pool_size, max_clients)

    def ready(s: PolicyServer) -> None:
        print(
            f"par-deploy serve: listening on ws://{host}:{s.port} (health: http://{host}:{s.port}"
            f"{protocol.HEALTH_PATH}), backend {backend}, bundle {s.hello['bundle_hash'][:12]}",
            flush=True,
        )

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = loop.create_future()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda s=sig: stop.done() or stop.set_result(s))
        await server.run(host, port, stop, on_ready=ready)

    asyncio.run(main())
    print("par-deploy serve: stopped", flush=True)


class ServerThread:
    """A ``PolicyServer`` on its own event loop in a background thread (tests, benchmarks, one-process setups).

    ``with ServerThread(PolicyServer(bundle)) as st: RemotePolicy(st.url)``; ``stop()`` closes every connection.
    """

    def __init__(self, server: PolicyServer, host: str = "127.0.0.1", port: int = 0):
        self.server, self.host, self.port = server, host, port
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Future | None = None
        self._thread = threading.Thread(target=self._main, name="par-deploy-serve", daemon=True)

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def _main(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = self._loop.create_future()
            await self.server.run(self.host, self.port, self._stop, on_ready=self._on_ready)

        try:
            asyncio.run(main())
        except BaseException as e:  # reported to start()
            self._error = e
        finally:
            self._ready.set()

    def _on_ready(self, server: PolicyServer) -> None:
        self.port = server.port
        self._ready.set()

    def start(self, timeout: float = 120.0) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"policy server did not start within {timeout} s")
        if self._error is not None:
            raise self._error
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(lambda: self._stop.done() or self._stop.set_result(None))
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"policy server thread did not stop within {timeout} s")

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class ServerProcess:
    """``par-deploy serve`` in a child process (benchmarks, tests of signal handling); ``url`` once listening.

    ``stop()`` sends SIGTERM and returns the exit code; ``kill()`` is the fallback for a hung child.
    """

    def __init__(self, bundle_dir: str | Path, *args: str, env: dict[str, str] | None = None, timeout: float = 120.0):
        import os
        import subprocess
        import sys
        import tempfile

        cmd = [sys.executable, "-m", "par_deploy", "serve", str(bundle_dir), "--port", "0", *args]
        self.log = tempfile.TemporaryFile(mode="w+")  # the server's log: a pipe nobody reads could fill and block it
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        )
        line = self._first_line(timeout)
        if "listening on ws://" not in line:
            self.kill()
            self.log.seek(0)
            log_tail = self.log.read()[-2000:]
            self.proc.stdout.close()
            self.log.close()
            raise RuntimeError(f"par-deploy serve did not start: {line!r} {log_tail}")
        self.url = line.split("listening on ")[1].split()[0]

    def _first_line(self, timeout: float) -> str:
        done = threading.Event()
        timer = threading.Timer(timeout, lambda: done.is_set() or self.proc.kill())
        timer.start()
        try:
            return self.proc.stdout.readline()
        finally:
            done.set()
            timer.cancel()

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait for the exit code (the server closes its connections first)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            self.kill()
            self.proc.stdout.close()
            self.log.close()
