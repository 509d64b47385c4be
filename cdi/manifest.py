"""Evidence manifest: what an audit looked at, byte for byte, and how to check it later.

`manifest.json` holds the sha256 of every model file and every image (by set and path relative to
the set's folder) with the label or caption the model was queried with, the sha256 of each folder's
metadata.jsonl (null where there is none), the package versions, the seeds and the full configuration.
`verify` re-hashes a model directory, two image folders and their metadata.jsonl and lists every
difference from a manifest; keys an older manifest lacks are not differences.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from cdi.data import ImageRecord, discover_images
from cdi.data.images import METADATA_FILE
from cdi.hashing import sha256_file
from cdi.models.loading import fingerprint

#: 2: images carry "label" / "caption"; "metadata" holds each folder's metadata.jsonl sha256.
MANIFEST_VERSION = 2


def image_entries(records: Sequence[ImageRecord], root: str | Path) -> list[dict[str, Any]]:
    """One entry per image: set, path relative to `root`, sha256, and the label / caption the model is queried
    with where there is one (pass the records after `cdi.audit.apply_conditioning`)."""
    root = Path(root)
    entries = []
    for r in records:
        entry: dict[str, Any] = {"set": r.role, "path": r.path.relative_to(root).as_posix(), "sha256": r.sha256}
        if r.label is not None:
            entry["label"] = r.label
        if r.caption is not None:
            entry["caption"] = r.caption
        entries.append(entry)
    return entries


def metadata_digest(folder: str | Path) -> str | None:
    """sha256 of the folder's metadata.jsonl (labels, captions), None where it has none."""
    path = Path(folder) / METADATA_FILE
    return sha256_file(path) if path.is_file() else None


def image_metadata(suspect: str | Path, control: str | Path) -> dict[str, str | None]:
    """The `metadata` entry of a manifest: set -> sha256 of that folder's metadata.jsonl (None: no such file)."""
    return {"suspect": metadata_digest(suspect), "control": metadata_digest(control)}


def build_manifest(
    model_path: str | Path,
    model_fingerprint: str,
    model_files: dict[str, str],
    suspect_images: list[dict[str, str]],
    control_images: list[dict[str, str]],
    configuration: dict[str, Any],
    versions: dict[str, str],
    excluded_images: list[dict[str, str]] | None = None,
    reference_models: list[dict[str, Any]] | None = None,
    metadata: dict[str, str | None] | None = None,
) -> dict[str, Any]:
    """`excluded_images`: files of the two folders the audit left out (held out for a search).
    `reference_models`: path, fingerprint and files (relative path -> sha256) of each reference model.
    `metadata`: `image_metadata(suspect, control)`, the sha256 of each folder's metadata.jsonl; left out of the
    manifest when not given (verify then does not check metadata.jsonl)."""
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"path": str(model_path), "fingerprint": model_fingerprint, "files": dict(sorted(model_files.items()))},
        "reference_models": [{"path": str(r["path"]), "fingerprint": r["fingerprint"], "files": dict(sorted(r["files"].items()))}
                             for r in (reference_models or [])],
        "images": [*suspect_images, *control_images],
        "excluded_images": list(excluded_images or []),
        "configuration": configuration,
        "seeds": {"seed": configuration.get("seed")},
        "versions": versions,
    }
    if metadata is not None:
        manifest["metadata"] = dict(metadata)
    return manifest


@dataclass
class VerifyReport:
    differences: list[str] = field(default_factory=list)
    checked_files: int = 0

    @property
    def ok(self) -> bool:
        return not self.differences


def _compare(kind: str, expected: dict[str, str], actual: dict[str, str], out: list[str]) -> None:
    for name in sorted(set(expected) | set(actual)):
        if name not in actual:
            out.append(f"{kind} {name}: missing")
        elif name not in expected:
            out.append(f"{kind} {name}: not in the manifest")
        elif expected[name] != actual[name]:
            out.append(f"{kind} {name}: sha256 {actual[name][:12]}... differs from the manifest's {expected[name][:12]}...")


def _lora_files(lora: str | Path | None) -> dict[str, str]:
    """The `lora/...` entries of an audited base + LoRA model, re-hashed from `lora`."""
    from cdi.models.lora import lora_files

    return lora_files(lora) if lora is not None and Path(lora).is_file() else {}


def verify(manifest: dict[str, Any], model: str | Path, suspect: str | Path, control: str | Path,
           reference_models: Sequence[str | Path] | None = None, lora: str | Path | None = None) -> VerifyReport:
    """Re-hash the model, its LoRA, the reference models and the two image folders; list every difference
    from `manifest`. Reference models are looked for at `reference_models` (in the audit's order), else at
    the paths the manifest records."""
    report = VerifyReport()
    _, files = fingerprint(Path(model))
    files.update(_lora_files(lora))
    _compare("model file", manifest["model"]["files"], files, report.differences)
    report.checked_files += len(files)
    recorded = manifest.get("reference_models", [])
    given = list(reference_models or [])
    if given and len(given) != len(recorded):
        report.differences.append(f"reference models: {len(given)} given, the audit used {len(recorded)}")
    for k, entry in enumerate(recorded):
        root = Path(given[k]) if k < len(given) else Path(entry["path"])
        if not root.is_dir():
            report.differences.append(f"reference model {root}: missing (give it with --reference-model)")
            continue
        _, reference_files = fingerprint(root)
        _compare(f"reference model {k + 1} file", entry["files"], reference_files, report.differences)
        report.checked_files += len(reference_files)
    for role, folder in (("suspect", suspect), ("control", control)):
        listed = [*manifest["images"], *manifest.get("excluded_images", [])]
        expected = {e["path"]: e["sha256"] for e in listed if e["set"] == role}
        actual = {e["path"]: e["sha256"] for e in image_entries(discover_images(folder, role), folder)}
        _compare(f"{role} image", expected, actual, report.differences)
        report.checked_files += len(actual)
        if role in manifest.get("metadata", {}):  # older manifests did not record metadata.jsonl
            recorded_digest, digest = manifest["metadata"][role], metadata_digest(folder)
            _compare(role, {METADATA_FILE: recorded_digest} if recorded_digest else {},
                     {METADATA_FILE: digest} if digest else {}, report.differences)
            report.checked_files += digest is not None
    return report
