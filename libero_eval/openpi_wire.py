"""openpi's policy protocol on the wire, decoded defensively (`libero-eval serve` reads what any client sends).

openpi's protocol (openpi-client's `websocket_client_policy` and `msgpack_numpy`): a websocket; on connect
the server sends a metadata dict; then each binary message from the client is one observation dict and
the server answers with one dict holding `actions`; a text frame instead is an error the client raises.
Payloads are msgpack; a numpy array travels as a map {b"__ndarray__": True, b"data": raw bytes,
b"dtype": the dtype's str (e.g. "<f4"), b"shape": [...]}, a numpy scalar as {b"__npgeneric__": True,
b"data": value, b"dtype": ...}.

Nothing here evaluates or unpickles client data: msgpack itself only builds plain values; an array map is
rebuilt only for an allow-listed little-endian numeric dtype, a shape of at most MAX_NDIM non-negative
ints and data of exactly the size the shape says; a message over the size cap is refused before decoding.
"""
from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

from policies.base import IMAGE_KEY, PROMPT_KEY, STATE_KEY, STEP_KEY, WRIST_IMAGE_KEY
from policies.serving import openpi_remote

ALLOWED_DTYPES = ("|b1", "|u1", "|i1", "<u2", "<i2", "<u4", "<i4", "<u8", "<i8", "<f2", "<f4", "<f8")
MAX_NDIM = 4
IMAGE_SHAPE = (224, 224, 3)  # openpi's LIBERO client resizes with pad to 224 (tasks/protocol.py does the same)
STATE_DIM = 8
# the optional request keys and the reply's record key, defined once beside the client side
EPISODE_KEY, SEED_KEY, REPLY_KEY = openpi_remote.EPISODE_KEY, openpi_remote.SEED_KEY, openpi_remote.REPLY_KEY
MAX_DIM = 1 << 31  # any one dimension; with the exact data size this bounds what a shape can ask for
MAX_CONTAINER = 4096  # entries of any one msgpack map or list: a message cannot ask for millions of objects


class WireError(ValueError):
    """A message that is not a valid request; the text is sent back to the client."""


def _pack_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.str not in ALLOWED_DTYPES:
            obj = obj.astype(obj.dtype.newbyteorder("<")) if obj.dtype.kind in "biuf" else obj
        if obj.dtype.str not in ALLOWED_DTYPES:
            raise TypeError(f"cannot send an array of dtype {obj.dtype}")
        return {b"__ndarray__": True, b"data": np.ascontiguousarray(obj).tobytes(), b"dtype": obj.dtype.str,
                b"shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot send a {type(obj).__name__}")


def pack(obj: Any) -> bytes:
    """msgpack with numpy arrays as openpi's clients decode them."""
    return msgpack.packb(obj, default=_pack_default)


def _array(obj: dict) -> np.ndarray:
    if set(obj) != {b"__ndarray__", b"data", b"dtype", b"shape"}:
        raise WireError(f"an array map needs exactly __ndarray__, data, dtype and shape, got {sorted(map(repr, obj))}")
    dtype, shape, data = obj[b"dtype"], obj[b"shape"], obj[b"data"]
    if dtype not in ALLOWED_DTYPES:
        raise WireError(f"array dtype {dtype!r} is not accepted (expected one of {', '.join(ALLOWED_DTYPES)})")
    if (not isinstance(shape, (list, tuple)) or len(shape) > MAX_NDIM
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < MAX_DIM for d in shape)):
        raise WireError(f"array shape must be a list of at most {MAX_NDIM} ints in [0, 2^31), got {shape!r}")
    if not isinstance(data, bytes):
        raise WireError(f"array data must be bytes, got {type(data).__name__}")
    expected = math.prod(shape) * np.dtype(dtype).itemsize
    if len(data) != expected:
        raise WireError(f"array of shape {list(shape)} and dtype {dtype} needs {expected} bytes, got {len(data)}")
    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape)


def _scalar(obj: dict) -> Any:
    if set(obj) != {b"__npgeneric__", b"data", b"dtype"} or obj[b"dtype"] not in ALLOWED_DTYPES:
        raise WireError(f"a numpy scalar needs __npgeneric__, data and an accepted dtype, got {obj.get(b'dtype')!r}")
    value, dtype = obj[b"data"], np.dtype(obj[b"dtype"])
    if not isinstance(value, (int, float)) or (isinstance(value, bool) != (dtype.kind == "b")):
        raise WireError(f"a numpy scalar of dtype {dtype.str} cannot hold {value!r}")
    with np.errstate(over="ignore", invalid="ignore"):
        scalar = dtype.type(value)
    if dtype.kind in "iu" and scalar != value:
        raise WireError(f"{value!r} does not fit a numpy scalar of dtype {dtype.str}")
    return scalar


def _decode(obj: dict) -> Any:
    if b"__ndarray__" in obj:
        return _array(obj)
    if b"__npgeneric__" in obj:
        return _scalar(obj)
    return obj


def unpack(message: bytes | str, max_bytes: int) -> Any:
    """One client message as plain values and arrays; WireError naming what is wrong."""
    if isinstance(message, str):
        raise WireError("expected a binary msgpack message, got a text frame")
    if len(message) > max_bytes:
        raise WireError(f"message of {len(message)} bytes exceeds this server's cap of {max_bytes} bytes "
                        "(libero-eval serve --max-message-mb)")
    try:
        return msgpack.unpackb(message, object_hook=_decode, max_array_len=MAX_CONTAINER, max_map_len=MAX_CONTAINER)
    except WireError:
        raise
    except Exception as exc:  # msgpack's own errors: ExtraData, FormatError, StackError, ValueError, ...
        raise WireError(f"not a msgpack message ({type(exc).__name__}: {exc})") from None


def check_observation(obj: Any, needs_images: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """An observation as the engine takes it (openpi's LIBERO keys: uint8 [224, 224, 3] images, an 8-d
    state, a prompt; `env_step` optional) and the client's episode marks ({EPISODE_KEY, SEED_KEY}, either
    absent). Other keys are ignored once decoded (every array in a message must pass `unpack`'s allow-list,
    whatever its key); WireError names the first problem."""
    if not isinstance(obj, dict):
        raise WireError(f"expected a map (the observation dict), got {type(obj).__name__}")
    required = [STATE_KEY, PROMPT_KEY] + ([IMAGE_KEY, WRIST_IMAGE_KEY] if needs_images else [])
    missing = [k for k in required if k not in obj]
    if missing:
        raise WireError(f"missing key(s) {', '.join(missing)}; expected {', '.join(required)} (openpi's LIBERO keys)")
    observation: dict[str, Any] = {}
    for key in (IMAGE_KEY, WRIST_IMAGE_KEY) if needs_images else ():
        image = obj[key]
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.shape != IMAGE_SHAPE:
            got = (f"{image.dtype} {list(image.shape)}" if isinstance(image, np.ndarray) else type(image).__name__)
            raise WireError(f"{key}: expected a uint8 array of shape {list(IMAGE_SHAPE)} (resize with pad to 224 "
                            f"on the client, as openpi's example does), got {got}")
        observation[key] = np.array(image)  # writable, owned
    state = obj[STATE_KEY]
    if (not isinstance(state, np.ndarray) or state.dtype.kind not in "iuf" or state.shape != (STATE_DIM,)
            or not np.all(np.isfinite(state))):
        got = f"{state.dtype} {list(state.shape)}" if isinstance(state, np.ndarray) else type(state).__name__
        raise WireError(f"{STATE_KEY}: expected {STATE_DIM} finite numbers (eef pos, axis-angle, gripper), got {got}")
    observation[STATE_KEY] = state.astype(np.float32)
    if not isinstance(obj[PROMPT_KEY], str) or not obj[PROMPT_KEY].strip():
        raise WireError(f"{PROMPT_KEY}: expected the task's instruction as a non-empty string")
    observation[PROMPT_KEY] = obj[PROMPT_KEY]
    if STEP_KEY in obj:
        observation[STEP_KEY] = _non_negative_int(obj[STEP_KEY], STEP_KEY)
    marks: dict[str, Any] = {}
    if EPISODE_KEY in obj:
        if not isinstance(obj[EPISODE_KEY], (str, int)) or isinstance(obj[EPISODE_KEY], bool):
            raise WireError(f"{EPISODE_KEY}: expected a string or an int naming the episode")
        marks[EPISODE_KEY] = obj[EPISODE_KEY]
    if SEED_KEY in obj:
        marks[SEED_KEY] = _non_negative_int(obj[SEED_KEY], SEED_KEY)
    return observation, marks


def _non_negative_int(value: Any, key: str) -> int:
    if isinstance(value, np.integer):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise WireError(f"{key}: expected a non-negative int, got {value!r}")
    return value
