"""Read back what an offline W&B run wrote, for tests: wandb has no public reader for offline runs.

An offline run directory (`wandb/offline-run-*/`) holds `run-<id>.wandb`, a LevelDB-style record log of
wandb's protobuf `Record`s (wandb.proto.wandb_internal_pb2), plus the logged media under `files/`.

Log format (what wandb-core writes): a 7-byte file header (":W&B", magic 0xBEE1 little-endian, version 0),
then 32 KiB blocks of chunks; a chunk is a 7-byte header (CRC-32 of type byte + payload, payload length,
type: 1 full, 2 first, 3 middle, 4 last) and its payload; a block tail shorter than a header is padding.
"""
from __future__ import annotations

import dataclasses
import json
import struct
import zlib
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

_HEADER = struct.Struct("<4sHB")
_CHUNK = struct.Struct("<IHB")
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> list[pb.Record]:
    """Every Record in a `.wandb` file, checksums verified."""
    data = Path(path).read_bytes()
    ident, magic, version = _HEADER.unpack_from(data, 0)
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path}: not a W&B record log (header {ident!r}, magic {magic:#x}, version {version})")
    pos, pending, records = _HEADER.size, b"", []
    while pos + _CHUNK.size <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK.size:
            pos += left
            continue
        crc, length, kind = _CHUNK.unpack_from(data, pos)
        if kind == 0 and length == 0:  # zero padding up to the block end
            pos += left
            continue
        payload = data[pos + _CHUNK.size: pos + _CHUNK.size + length]
        if zlib.crc32(bytes([kind]) + payload) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: checksum mismatch in the chunk at byte {pos}")
        pos += _CHUNK.size + length
        if kind in (_FULL, _FIRST):
            pending = payload
        else:
            pending += payload
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _key(item) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


@dataclasses.dataclass
class OfflineRun:
    """What one offline run holds, decoded: config, history rows, the final summary, files."""

    dir: Path
    run_id: str
    project: str
    group: str
    job_type: str
    name: str
    tags: list[str]
    config: dict[str, Any]
    history: list[dict[str, Any]]
    summary: dict[str, Any]
    files: list[str]  # paths relative to files/
    exit_code: int | None

    def file(self, rel: str) -> Path:
        return self.dir / "files" / rel

    def table(self, key: str, row: dict[str, Any] | None = None) -> dict[str, Any]:
        """The table logged under `key` (in `row`, or the summary's latest): {"columns", "data"}."""
        ref = (row or self.summary)[key]
        if ref.get("_type") != "table-file":
            raise ValueError(f"{key} is a {ref.get('_type')!r}, not a table")
        return json.loads(self.file(ref["path"]).read_text())


def read_run(run_dir: str | Path) -> OfflineRun:
    """Decode `wandb/offline-run-*/run-<id>.wandb` into an OfflineRun (history values JSON-decoded; media
    values are their reference dicts, e.g. {"_type": "video-file", "path": ...})."""
    run_dir = Path(run_dir)
    logs = list(run_dir.glob("run-*.wandb"))
    if len(logs) != 1:
        raise ValueError(f"{run_dir}: expected one run-*.wandb file, found {logs}")
    out = OfflineRun(run_dir, "", "", "", "", "", [], {}, [], {}, [], None)
    for record in read_records(logs[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out.run_id, out.project, out.group = run.run_id, run.project, run.run_group
            out.job_type, out.name, out.tags = run.job_type, run.display_name, list(run.tags)
            for item in run.config.update:
                out.config[_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                out.config[_key(item)] = json.loads(item.value_json)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _set_nested(row, list(item.nested_key) or [item.key], json.loads(item.value_json))
            out.history.append(row)
        elif kind == "summary":
            for item in record.summary.update:
                _set_nested(out.summary, list(item.nested_key) or [item.key], json.loads(item.value_json))
            for item in record.summary.remove:
                out.summary.pop(_key(item), None)
        elif kind == "files":
            out.files.extend(f.path for f in record.files.files)
        elif kind == "exit":
            out.exit_code = record.exit.exit_code
    out.config.pop("_wandb", None)
    return out


def _set_nested(target: dict, keys: list[str], value: Any) -> None:
    """Summary updates come as nested keys (["frames", "path"]) for media and as flat keys with "/"
    (["episode/success"]) for logged metrics; media sub-keys nest under their media key."""
    if len(keys) == 1:
        target[keys[0]] = value
        return
    node = target.setdefault(keys[0], {})
    if not isinstance(node, dict):
        node = target[keys[0]] = {}
    _set_nested(node, keys[1:], value)


def read_runs(wandb_dir: str | Path) -> list[OfflineRun]:
    """Every offline run under a `wandb/` directory, sorted by directory name (start time, to the second)."""
    return [read_run(d) for d in sorted(Path(wandb_dir).glob("offline-run-*"))]
