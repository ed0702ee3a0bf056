"""The policy-server wire protocol, shared by the server and the torch-free client (numpy + msgpack only).

Transport: one websocket per client; every message is one binary frame holding one msgpack map. Untrusted
input is decoded strictly: msgpack with string map keys and no extension types, every field type checked,
arrays only where the protocol expects one, never pickle.

Arrays travel as ``{"dtype": "float32", "shape": [8, 4], "data": <bytes, little-endian, C order>}`` with the
dtype from ``ARRAY_DTYPES`` and ``len(data) == prod(shape) * itemsize <= max_bytes``.

Messages (``PROTOCOL_VERSION`` 1):

- server -> client, once on connect: ``{"type": "hello", "protocol": 1, "spec": {PolicySpec fields},
  "backend": str, "bundle_hash": str (sha256 of manifest.json), "denoise_steps": K, "noise_shape": [K+1, L, A],
  "max_message_bytes": int}``
- client -> server: ``{"op": "reset", "instruction": str | None, "seed": int | None}`` or
  ``{"op": "act", "observation": {"rgb": array, "state": array}, "noise": array | None, "executed": array}``
  (``executed``, optional: the chunk the controller executed since the previous ``act`` when it differs from the
  one returned; absent means "the chunk returned". Sent only when given, so a client that never passes it works
  with any protocol-1 server; a server that predates it refuses it as an unknown field)
- server -> client, one per request: ``{"ok": true, "steps_left": int | None, "timing": {...}}`` (+ ``"actions"``: array
  ``[L, A]`` for ``act``) or ``{"ok": false, "error": {"type": name, "message": str}, "steps_left": int,
  "timing": {...}}``. ``timing``: ``server_ms`` (message received -> reply encoded), ``compute_ms`` (inside the
  policy). Error ``type`` is one of ``ERROR_TYPES``; the client raises that class.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import msgpack
import numpy as np

from par_deploy.errors import ActionError, CacheFullError, InputError, ParError
from par_deploy.runtime.policy import PolicySpec

PROTOCOL_VERSION = 1
ARRAY_DTYPES = frozenset({"bool", "uint8", "int32", "int64", "float16", "float32", "float64"})
ARRAY_MAX_DIMS = 8
MAX_TEXT = 4096  # characters of an instruction or an error message
HEALTH_PATH = "/healthz"


class ProtocolError(ParError):
    """A message does not follow the policy-server protocol (malformed, wrong types, over a size limit)."""


class RemoteError(ParError, RuntimeError):
    """The server failed for a reason that is not a par-deploy input/cache/action error (message says which)."""


class ServerUnavailable(ParError, ConnectionError):
    """The policy server cannot be reached, closed the connection, or did not answer in time."""


# The error types a reply may name; anything else the server raises is reported as RemoteError.
ERROR_TYPES: dict[str, type[ParError]] = {
    c.__name__: c for c in (InputError, CacheFullError, ActionError, ProtocolError, RemoteError)
}


# ---------------------------------------------------------------------------------------------------------
# msgpack framing


def _no_ext(code: int, data: bytes):
    raise ProtocolError(f"msgpack extension type {code} is not part of the protocol")


def pack(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(data: bytes | str) -> dict[str, Any]:
    """One frame -> a map with string keys; anything else raises ``ProtocolError``."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError("expected a binary websocket frame holding one msgpack map, got a text frame")
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True, ext_hook=_no_ext)
    except ProtocolError:
        raise
    except Exception as e:  # msgpack raises ExtraData, FormatError, StackError, ValueError, ...
        raise ProtocolError(f"message is not valid msgpack ({type(e).__name__}: {e})") from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"message must be a msgpack map, found {type(msg).__name__}")
    return msg


# ---------------------------------------------------------------------------------------------------------
# arrays


def encode_array(x: np.ndarray, name: str) -> dict[str, Any]:
    """ndarray -> wire form; refuses dtypes outside ``ARRAY_DTYPES`` (object, strings, structured...)."""
    if not isinstance(x, np.ndarray):
        raise InputError(f"{name}: expected a numpy array, found {type(x).__name__}")
    if x.dtype.name not in ARRAY_DTYPES:
        raise InputError(f"{name}: dtype {x.dtype} cannot be sent; use one of {sorted(ARRAY_DTYPES)}")
    le = np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("<"))
    return {"dtype": x.dtype.name, "shape": list(x.shape), "data": le.tobytes()}


def decode_array(obj: Any, name: str, max_bytes: int) -> np.ndarray:
    """Wire form -> a new, writable, native-endian ndarray, after checking dtype, shape and byte count."""
    if not isinstance(obj, dict) or set(obj) != {"dtype", "shape", "data"}:
        raise ProtocolError(f"{name}: expected an array map with keys dtype, shape, data")
    dtype, shape, data = obj["dtype"], obj["shape"], obj["data"]
    if not isinstance(dtype, str) or dtype not in ARRAY_DTYPES:
        raise ProtocolError(f"{name}: dtype {dtype!r} is not allowed; use one of {sorted(ARRAY_DTYPES)}")
    if (
        not isinstance(shape, list)
        or len(shape) > ARRAY_MAX_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d for d in shape)
    ):
        raise ProtocolError(f"{name}: shape must be a list of at most {ARRAY_MAX_DIMS} non-negative ints")
    if not isinstance(data, bytes):
        raise ProtocolError(f"{name}: data must be msgpack bin, found {type(data).__name__}")
    wire = np.dtype(dtype).newbyteorder("<")
    nbytes = math.prod(shape) * wire.itemsize  # Python ints: no overflow
    if nbytes > max_bytes:
        raise ProtocolError(f"{name}: {nbytes} bytes exceed the limit of {max_bytes}")
    if nbytes != len(data):
        raise ProtocolError(f"{name}: shape {shape} x {dtype} needs {nbytes} bytes, found {len(data)}")
    return np.frombuffer(data, dtype=wire).reshape(shape).astype(np.dtype(dtype))  # copy, native order


# ---------------------------------------------------------------------------------------------------------
# fields


def field(msg: dict[str, Any], key: str, kinds: tuple[type, ...], optional: bool = False) -> Any:
    """``msg[key]`` checked against ``kinds`` (bool is never accepted as an int)."""
    value = msg.get(key)
    if value is None and optional:
        return None
    if value is None or (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        want = " or ".join(k.__name__ for k in kinds) + (" or nil" if optional else "")
        raise ProtocolError(f"field {key!r}: expected {want}, found {type(value).__name__}")
    return value


def check_keys(msg: dict[str, Any], allowed: set[str], what: str) -> None:
    extra = set(msg) - allowed
    if extra:
        raise ProtocolError(f"{what}: unknown field(s) {sorted(extra)}; allowed: {sorted(allowed)}")


# ---------------------------------------------------------------------------------------------------------
# requests (built by the client, checked by the server)


def reset_request(instruction: str | None, seed: int | None) -> dict[str, Any]:
    return {"op": "reset", "instruction": instruction, "seed": None if seed is None else int(seed)}


def act_request(
    observation: dict[str, np.ndarray], noise: np.ndarray | None, executed: np.ndarray | None = None
) -> dict[str, Any]:
    if not isinstance(observation, dict):
        raise TypeError(f"observation: expected a dict with 'rgb' and 'state', found {type(observation).__name__}")
    obs = {k: encode_array(observation[k], f"observation[{k!r}]") for k in ("rgb", "state") if k in observation}
    request = {"op": "act", "observation": obs, "noise": None if noise is None else encode_array(noise, "noise")}
    if executed is not None:
        request["executed"] = encode_array(executed, "executed")
    return request


def parse_reset(msg: dict[str, Any]) -> tuple[str | None, int | None]:
    check_keys(msg, {"op", "instruction", "seed"}, "reset")
    instruction = field(msg, "instruction", (str,), optional=True)
    if instruction is not None and len(instruction) > MAX_TEXT:
        raise ProtocolError(f"field 'instruction': longer than {MAX_TEXT} characters")
    seed = field(msg, "seed", (int,), optional=True)
    if seed is not None and not 0 <= seed < 2**63:
        raise ProtocolError(f"field 'seed': expected an int in [0, 2**63), found {seed}")
    return instruction, seed


def parse_act(
    msg: dict[str, Any], max_bytes: int
) -> tuple[dict[str, np.ndarray], np.ndarray | None, np.ndarray | None]:
    """An act request -> (observation, noise, executed); the arrays' shapes and dtypes are the policy's to check."""
    check_keys(msg, {"op", "observation", "noise", "executed"}, "act")
    raw = field(msg, "observation", (dict,))
    check_keys(raw, {"rgb", "state"}, "act observation")
    obs = {k: decode_array(v, f"observation[{k!r}]", max_bytes) for k, v in raw.items()}
    noise, executed = (msg.get(k) for k in ("noise", "executed"))
    return (
        obs,
        None if noise is None else decode_array(noise, "noise", max_bytes),
        None if executed is None else decode_array(executed, "executed", max_bytes),
    )


# ---------------------------------------------------------------------------------------------------------
# replies and errors


def error_reply(exc: BaseException) -> dict[str, Any]:
    """An exception -> the reply's error map. Input-like errors of the policy (ValueError: unknown instruction,
    TypeError) become ``InputError``; par-deploy errors keep their type; the rest is ``RemoteError``."""
    name = type(exc).__name__
    message = str(exc)
    if name not in ERROR_TYPES:
        if isinstance(exc, ValueError | TypeError) and not isinstance(exc, ParError):
            name = "InputError"
        else:
            name, message = "RemoteError", f"{type(exc).__name__}: {exc}"
    return {"ok": False, "error": {"type": name, "message": message[:MAX_TEXT]}}


def raise_error(reply: dict[str, Any]) -> None:
    """Raise the par-deploy error a failed reply names (``RemoteError`` for an unknown name)."""
    err = reply.get("error")
    if not isinstance(err, dict):
        raise ProtocolError("failed reply without an error map")
    cls = ERROR_TYPES.get(err.get("type"), RemoteError)
    raise cls(f"server: {err.get('message', '')}")


def spec_to_dict(spec: PolicySpec) -> dict[str, Any]:
    d = dataclasses.asdict(spec)
    d["instructions"] = list(spec.instructions)
    return d


def spec_from_dict(d: Any) -> PolicySpec:
    if not isinstance(d, dict):
        raise ProtocolError("hello: 'spec' must be a map")
    names = [f.name for f in dataclasses.fields(PolicySpec)]  # fields a newer server adds are ignored
    try:
        ints = {k: int(d[k]) for k in names if k not in ("instructions", "overflow", "exec_len")}
        ints["exec_len"] = int(d.get("exec_len", 0))  # absent from an older server: the whole chunk
        overflow = str(d.get("overflow", "error"))
        if overflow not in ("error", "slide"):
            raise ValueError(f"overflow {overflow!r}")
        return PolicySpec(**ints, instructions=tuple(str(s) for s in d["instructions"]), overflow=overflow)
    except (KeyError, TypeError, ValueError) as e:
        raise ProtocolError(f"hello: invalid policy spec ({e})") from None
