"""Feature cache: finished batches on disk, keyed by (model fingerprint, feature configuration, seed).

Layout: `<cache_dir>/<model fingerprint[:16]>/<configuration key>/shard-<session>r<rank>-<uuid>.<sha256>.npz`,
one shard per finished batch (image sha256s, row keys, feature names, values), written to a temporary file
and renamed, so an extraction killed at any moment (SIGKILL included) leaves only whole shards and loses no
finished batch. The `<sha256>` in the name is that of the shard's bytes: a shard damaged later (a truncated
copy, a flipped bit) is moved to `<root>/damaged/` and its rows recomputed. Shards written before the
checksum (`shard-<session>r<rank>-<uuid>.npz`) still load; the zip CRC guards them.

Rows are merged by row key (`row_key`): the image sha256 for an unconditioned model; for a class- or
text-conditioned one a digest of the sha256 and the label or caption the model is queried with, so an
image relabelled is recomputed. Re-audits, searches and other ranks reuse the shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import uuid
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from cdi.hashing import sha256_text

log = logging.getLogger(__name__)

#: Bump when a feature's computation changes, so stale cached values are never reused.
FEATURE_CODE_VERSION = 1
DAMAGED_FOLDER = "damaged"
_CHECKSUM = re.compile(r"\.([0-9a-f]{64})\.npz$")


def default_cache_dir() -> Path:
    base = os.environ.get("CDI_CACHE_DIR")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cdi" / "features"


def configuration_key(config: dict, seed: int) -> str:
    payload = json.dumps({"config": config, "seed": int(seed), "code": FEATURE_CODE_VERSION}, sort_keys=True)
    return sha256_text(payload)[:16]


def effective_label(label: Any) -> int | str | None:
    """The class id the extractor queries the model with: None (no label; the dataset's -1) or an int."""
    if label is None:
        return None
    try:
        value = int(label)
    except (TypeError, ValueError):
        return str(label)  # an unresolved class name: the extractor refuses it
    return None if value < 0 else value


def effective_caption(caption: str | None) -> str | None:
    """The caption the extractor passes to the adapter: an empty caption is no caption (the empty prompt)."""
    return caption or None


def row_key(sha256: str, conditioning: str, label: Any = None, caption: str | None = None) -> str:
    """Cache key of one image's features: everything a row depends on beyond the model, settings and seed
    (those are in the cache's folder names). Unconditioned models keep the plain sha256, so caches written
    before conditioning was part of the key stay valid. The feature noise stays seeded by the sha256 alone."""
    if conditioning == "class":
        payload = {"image": sha256, "label": effective_label(label)}
    elif conditioning == "text":
        payload = {"image": sha256, "caption": effective_caption(caption)}
    else:
        return sha256
    return sha256_text(json.dumps(payload, sort_keys=True))


class _Damaged(Exception):
    """A shard whose bytes fail their checksum or do not decode."""


@dataclass
class FeatureCache:
    """Cached per-image feature values of one (model, configuration, seed)."""

    root: Path
    _damaged: int = field(default=0, init=False, repr=False, compare=False)  # shards set aside, not yet reported

    @classmethod
    def open(cls, cache_dir: str | Path, model_fingerprint: str, config: dict, seed: int) -> "FeatureCache":
        root = Path(cache_dir) / model_fingerprint[:16] / configuration_key(config, seed)
        root.mkdir(parents=True, exist_ok=True)
        meta = root / "configuration.json"
        expected = {"model_fingerprint": model_fingerprint, "config": config, "seed": seed,
                    "code": FEATURE_CODE_VERSION}
        if not meta.exists() or not _is_json_object(meta):
            if meta.exists():
                log.warning("feature cache %s: configuration.json is damaged; rewriting it", root)
            _atomic_write_text(meta, json.dumps(expected, indent=2))
        return cls(root)

    def write(self, sha256: Sequence[str], names: Sequence[str], values: np.ndarray,
              seconds: dict[str, float] | None = None, session: str = "",
              keys: Sequence[str] | None = None) -> Path:
        """Store one finished batch atomically (with the seconds each family took, for reports). `keys`: the
        rows' `row_key`s where they are not the plain sha256s (conditioned models)."""
        arrays = {"sha256": np.asarray(list(sha256)), "names": np.asarray(list(names)),
                  "values": np.asarray(values, dtype=np.float64), "seconds": np.asarray(json.dumps(seconds or {}))}
        if keys is not None and list(keys) != list(sha256):
            arrays["key"] = np.asarray(list(keys))
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        payload = buffer.getvalue()
        path = self.root / f"shard-{session}{uuid.uuid4().hex}.{hashlib.sha256(payload).hexdigest()}.npz"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        return path

    def load(self, keys: Iterable[str], names: Sequence[str]) -> dict[str, np.ndarray]:
        """Cached rows (in `names` order) of the requested row keys that have every requested feature."""
        wanted = set(keys)
        found: dict[str, dict[str, float]] = {}
        for shard in self._shards():
            data = self._read(shard)
            if data is None:
                continue
            shard_names, values = list(data["names"]), data["values"]
            for row, key in enumerate(data["key"]):
                key = str(key)
                if key in wanted:
                    found.setdefault(key, {}).update(zip(shard_names, values[row].tolist()))
        self._report_damage()
        rows = {}
        for key, by_name in found.items():
            if all(name in by_name for name in names):
                rows[key] = np.array([by_name[name] for name in names], dtype=np.float64)
        return rows

    def drop(self, keys: set[str]) -> None:
        """Forget these rows (e.g. non-finite features): rewrite the shards that hold them without those rows,
        keeping every other row's cached features."""
        for shard in self._shards():
            data = self._read(shard)
            if data is None:
                continue
            keep = np.array([str(key) not in keys for key in data["key"]], dtype=bool)
            if keep.all():
                continue
            if keep.any():
                self.write(data["sha256"][keep], list(data["names"]), data["values"][keep], data["seconds"],
                           keys=data["key"][keep].tolist())
            shard.unlink(missing_ok=True)
        self._report_damage()

    def seconds(self, session: str) -> dict[str, float]:
        """Seconds per family summed over the shards one extraction session wrote (all ranks)."""
        totals: dict[str, float] = {}
        for shard in self._shards(f"shard-{session}*.npz"):
            data = self._read(shard)
            for family, sec in (data["seconds"] if data else {}).items():
                totals[family] = totals.get(family, 0.0) + sec
        self._report_damage()
        return totals

    # -- reading ----------------------------------------------------------------------------
    def _shards(self, pattern: str = "shard-*.npz") -> list[Path]:
        return sorted(self.root.glob(pattern))

    def _read(self, shard: Path) -> dict[str, Any] | None:
        """A shard's arrays (`key` filled with the sha256s where the shard has none); None if it vanished (another
        process rewrote it) or is damaged, in which case it is moved to `damaged/` and counted for the warning."""
        try:
            payload = shard.read_bytes()
            match = _CHECKSUM.search(shard.name)
            if match and hashlib.sha256(payload).hexdigest() != match.group(1):
                raise _Damaged("checksum")
            with np.load(io.BytesIO(payload)) as data:
                arrays = {"sha256": data["sha256"], "names": data["names"], "values": data["values"],
                          "key": data["key"] if "key" in data.files else data["sha256"],
                          "seconds": json.loads(str(data["seconds"])) if "seconds" in data.files else {}}
            if arrays["values"].shape != (len(arrays["sha256"]), len(arrays["names"])) or \
                    len(arrays["key"]) != len(arrays["sha256"]):
                raise _Damaged("shape")
            return arrays
        except FileNotFoundError:
            return None
        except (_Damaged, zipfile.BadZipFile, zlib.error, OSError, ValueError, KeyError, EOFError, TypeError):
            self._set_aside(shard)
            return None

    def _set_aside(self, shard: Path) -> None:
        damaged = self.root / DAMAGED_FOLDER
        try:
            damaged.mkdir(exist_ok=True)
            os.replace(shard, damaged / shard.name)
        except FileNotFoundError:
            return  # another process moved it first
        except OSError:  # a read-only folder for damaged shards: delete it instead
            try:
                shard.unlink(missing_ok=True)
            except OSError:
                pass
        self._damaged += 1

    def _report_damage(self) -> None:
        count, self._damaged = self._damaged, 0
        if count:
            log.warning("feature cache %s: %d damaged shard(s) (truncated or altered) moved to %s; their images' "
                        "features are being recomputed", self.root, count, self.root / DAMAGED_FOLDER)


def _is_json_object(path: Path) -> bool:
    try:
        return isinstance(json.loads(path.read_text()), dict)
    except (OSError, ValueError):
        return False


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
