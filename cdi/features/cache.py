"""Feature cache: finished batches on disk, keyed by (model fingerprint, feature configuration, seed).

Layout: `<cache_dir>/<model fingerprint[:16]>/<configuration key>/shard-*.npz`, one shard per finished
batch (image sha256s, feature names, values), written to a temporary file and renamed, so an
extraction killed at any moment (SIGKILL included) leaves only whole shards and loses no finished
batch. Shards are merged by image sha256: re-audits, searches and other ranks reuse them.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from cdi.hashing import sha256_text

#: Bump when a feature's computation changes, so stale cached values are never reused.
FEATURE_CODE_VERSION = 1


def default_cache_dir() -> Path:
    base = os.environ.get("CDI_CACHE_DIR")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cdi" / "features"


def configuration_key(config: dict, seed: int) -> str:
    payload = json.dumps({"config": config, "seed": int(seed), "code": FEATURE_CODE_VERSION}, sort_keys=True)
    return sha256_text(payload)[:16]


@dataclass
class FeatureCache:
    """Cached per-image feature values of one (model, configuration, seed)."""

    root: Path

    @classmethod
    def open(cls, cache_dir: str | Path, model_fingerprint: str, config: dict, seed: int) -> "FeatureCache":
        root = Path(cache_dir) / model_fingerprint[:16] / configuration_key(config, seed)
        root.mkdir(parents=True, exist_ok=True)
        meta = root / "configuration.json"
        if not meta.exists():
            _atomic_write_text(meta, json.dumps({"model_fingerprint": model_fingerprint, "config": config,
                                                 "seed": seed, "code": FEATURE_CODE_VERSION}, indent=2))
        return cls(root)

    def write(self, sha256: Sequence[str], names: Sequence[str], values: np.ndarray,
              seconds: dict[str, float] | None = None, session: str = "") -> Path:
        """Store one finished batch atomically (with the seconds each family took, for reports)."""
        path = self.root / f"shard-{session}{uuid.uuid4().hex}.npz"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as handle:
            np.savez(handle, sha256=np.asarray(list(sha256)), names=np.asarray(list(names)),
                     values=np.asarray(values, dtype=np.float64),
                     seconds=np.asarray(json.dumps(seconds or {})))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        return path

    def load(self, sha256: Iterable[str], names: Sequence[str]) -> dict[str, np.ndarray]:
        """Cached rows (in `names` order) of the requested images that have every requested feature."""
        wanted = set(sha256)
        found: dict[str, dict[str, float]] = {}
        for shard in sorted(self.root.glob("shard-*.npz")):
            try:
                with np.load(shard) as data:
                    shas, shard_names, values = data["sha256"], list(data["names"]), data["values"]
            except (OSError, ValueError, KeyError, EOFError):
                continue  # an unreadable shard is recomputed, never trusted
            for row, digest in enumerate(shas):
                digest = str(digest)
                if digest in wanted:
                    found.setdefault(digest, {}).update(zip(shard_names, values[row].tolist()))
        rows = {}
        for digest, by_name in found.items():
            if all(name in by_name for name in names):
                rows[digest] = np.array([by_name[name] for name in names], dtype=np.float64)
        return rows

    def drop(self, digests: set[str]) -> None:
        """Forget these images (e.g. non-finite features): rewrite the shards that hold them without
        their rows, keeping every other image's cached features."""
        for shard in sorted(self.root.glob("shard-*.npz")):
            try:
                with np.load(shard) as data:
                    shas, shard_names, values = data["sha256"], list(data["names"]), data["values"]
                    seconds = json.loads(str(data["seconds"])) if "seconds" in data.files else {}
            except (OSError, ValueError, KeyError, EOFError):
                continue
            keep = np.array([str(digest) not in digests for digest in shas], dtype=bool)
            if keep.all():
                continue
            if keep.any():
                self.write(shas[keep], shard_names, values[keep], seconds)
            shard.unlink(missing_ok=True)

    def seconds(self, session: str) -> dict[str, float]:
        """Seconds per family summed over the shards one extraction session wrote (all ranks)."""
        totals: dict[str, float] = {}
        for shard in self.root.glob(f"shard-{session}*.npz"):
            with np.load(shard) as data:
                for family, sec in json.loads(str(data["seconds"])).items():
                    totals[family] = totals.get(family, 0.0) + sec
        return totals


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
