"""The run directory: atomic writes, a lock, and a manifest that makes stages resumable.

Layout of ``runs/<name>/``::

    recipe.toml        the resolved recipe (defaults + file + --set)
    manifest.json      per stage: fingerprint, config, inputs, status, timings, outputs
    .lock              held by the one process that writes here
    pretrain/ affinity/ search/ finetune/ export/ ...   one folder per stage

A stage's *fingerprint* hashes its resolved config and the fingerprints of the stages it
reads. A stage whose fingerprint is unchanged and whose status is ``done`` is skipped; a
changed fingerprint clears the stage's folder (its checkpoints are stale) and redoes it.
A stage left ``running`` by a killed process resumes from the checkpoints in its folder.

Every file goes through :func:`atomic_write` (temp file in the same folder, fsync, then
``os.replace``), so a crash never leaves a half-written artifact.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from branchnas.errors import RunDirLocked, UserError

__all__ = [
    "RunDir",
    "StageResult",
    "atomic_write",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_torch_save",
    "atomic_savefig",
    "atomic_savez",
    "fingerprint",
    "file_sha256",
]

MANIFEST = "manifest.json"
LOCK = ".lock"
STAGING = ".staging"


# --------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[Any]:
    """Open a temp file next to ``path``; on success it replaces ``path`` in one step.

    On any exception the temp file is removed and ``path`` is left as it was.

    Example:
        >>> with atomic_write("out.txt", "w") as fh:  # doctest: +SKIP
        ...     fh.write("hello")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_write(path, "w") as fh:
        fh.write(text)


def atomic_write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set | tuple):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` atomically."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_write(path, "wb") as fh:
        fh.write(buffer.getbuffer())


def atomic_savez(path: str | Path, **arrays: Any) -> None:
    """``numpy.savez`` atomically (``path`` keeps its name; no ``.npz`` is appended)."""
    import numpy as np

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    with atomic_write(path, "wb") as fh:
        fh.write(buffer.getbuffer())


def atomic_savefig(fig: Any, path: str | Path, **kwargs: Any) -> None:
    """Save a matplotlib figure atomically as PNG and close it."""
    buffer = io.BytesIO()
    kwargs.setdefault("dpi", 120)
    kwargs.setdefault("bbox_inches", "tight")
    fig.savefig(buffer, format="png", **kwargs)
    import matplotlib.pyplot as plt

    plt.close(fig)
    with atomic_write(path, "wb") as fh:
        fh.write(buffer.getbuffer())


# --------------------------------------------------------------------------- hashing


def fingerprint(*parts: Any) -> str:
    """A stable short hash of JSON-able parts (dict key order does not matter)."""
    text = json.dumps(parts, sort_keys=True, default=_json_default)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- the run directory


class StageResult(dict):
    """What :meth:`RunDir.run_stage` returns: the stage's manifest entry plus ``skipped``."""


class RunDir:
    """A run directory with a manifest, a lock and per-stage folders.

    Args:
        path: the folder (created if missing).

    Example:
        >>> rd = RunDir("runs/shapes")  # doctest: +SKIP
        >>> with rd.locked():
        ...     rd.run_stage("search", config, ["affinity"], body)
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock_fh: Any = None

    # -- locking
    @contextlib.contextmanager
    def locked(self) -> Iterator[RunDir]:
        """Hold the run directory's lock; a second process gets :class:`RunDirLocked`.

        Re-entrant within one process (nested ``locked()`` calls are free).
        """
        if self._lock_fh is not None:
            yield self
            return
        self.path.mkdir(parents=True, exist_ok=True)
        fh = open(self.path / LOCK, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise RunDirLocked(
                f"run directory {str(self.path)!r} is in use by {holder}; wait for it to finish "
                "or choose another run directory (recipe key 'name' or 'out')"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        self._lock_fh = fh
        try:
            yield self
        finally:
            self._lock_fh = None
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            fh.close()

    # -- manifest
    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def manifest(self) -> dict[str, Any]:
        """The manifest as a dict (empty when the run directory is new)."""
        if not self.manifest_path.exists():
            return {"stages": {}}
        try:
            return json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError as err:  # only a hand edit can do this: writes are atomic
            raise UserError(f"{self.manifest_path}: not valid JSON ({err}); delete it to start the run afresh") from None

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        atomic_write_json(self.manifest_path, manifest)

    def stage_entry(self, stage: str) -> dict[str, Any] | None:
        """The manifest entry of ``stage``, or ``None``."""
        return self.manifest()["stages"].get(stage)

    def stage_dir(self, stage: str) -> Path:
        """The stage's folder (created)."""
        path = self.path / stage
        path.mkdir(parents=True, exist_ok=True)
        return path

    def stage_fingerprint(self, stage: str, config: Any, depends: list[str]) -> str:
        """Hash of the stage's config and the fingerprints of the stages it is keyed on."""
        upstream = {}
        for dep in depends:
            entry = self.stage_entry(dep)
            if entry is None or "fingerprint" not in entry or entry.get("status") == "stale":
                raise UserError(f"stage '{stage}' needs stage '{dep}' to be done first; run `branchnas {dep}`")
            upstream[dep] = entry["fingerprint"]
        return fingerprint(stage, config, upstream)

    def damaged_outputs(self, stage: str) -> list[str]:
        """The recorded outputs of ``stage`` that are missing or whose SHA-256 changed since written."""
        entry = self.stage_entry(stage) or {}
        hashes = entry.get("hashes")
        if hashes is None:  # written before hashes were recorded: existence is all we know
            return [out for out in entry.get("outputs", []) if not (self.path / out).exists()]
        return [out for out, digest in hashes.items()
                if not (self.path / out).is_file() or file_sha256(self.path / out) != digest]

    def is_done(self, stage: str, fp: str) -> bool:
        """True when ``stage``'s outputs were made with fingerprint ``fp`` and verify intact.

        The outputs of the last success count even when a later attempt (with other inputs)
        failed or was interrupted: that attempt never touched them.
        """
        entry = self.stage_entry(stage)
        if not entry or entry.get("fingerprint") != fp or entry.get("status") == "stale" or "outputs" not in entry:
            return False
        if entry.get("partial"):
            return False
        return not self.damaged_outputs(stage)

    def update_stage(self, stage: str, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` into the stage's manifest entry and write the manifest."""
        manifest = self.manifest()
        entry = manifest["stages"].setdefault(stage, {})
        entry.update(fields)
        self._write_manifest(manifest)
        return entry

    def save_recipe(self, recipe: Any) -> Path:
        """Write the resolved recipe as ``recipe.toml``."""
        from branchnas.recipe import recipe_to_toml

        path = self.path / "recipe.toml"
        atomic_write_text(path, recipe_to_toml(recipe))
        return path

    def staging_dir(self, stage: str) -> Path:
        """Where a run of ``stage`` writes until it succeeds (``<run>/.staging/<stage>``)."""
        return self.path / STAGING / stage

    def run_stage(
        self,
        stage: str,
        config: Any,
        depends: list[str],
        body: Callable[[Path], dict[str, Any] | None],
        force: bool = False,
        keep: Callable[[str], bool] | None = None,
    ) -> StageResult:
        """Run ``body(folder)`` unless the stage is already done with this fingerprint.

        ``body`` writes into a staging folder (``.staging/<stage>``) and returns
        ``{"outputs": [files], ...extras}`` (files relative to the folder, or ``<stage>/file``);
        the extras go into the manifest entry. Only when it returns does the staging folder
        replace the stage's folder, the outputs' SHA-256 get recorded and the entry say
        ``done``: a failing or interrupted body leaves the previous outputs exactly as they
        were. A failure is recorded as ``status: failed`` with the error; an interruption
        leaves ``status: running`` and the staging folder, from whose checkpoints a rerun
        with the same fingerprint resumes (other inputs, or ``force``, start it afresh).
        When the outputs of a done stage are damaged, the rerun starts from the ones that
        still verify; with ``force``, only those for which ``keep(output)`` is true.
        ``"partial": True`` in the result swaps in what is there but leaves the stage
        not done (``pretrain --tasks``: the next run trains the rest).
        """
        with self.locked():
            self._recover_swap(stage)
            fp = self.stage_fingerprint(stage, config, depends)
            if not force and self.is_done(stage, fp):
                entry = self.stage_entry(stage) or {}
                if entry.get("status") != "done":  # a failed attempt with other inputs came since
                    entry = self._replace_entry(stage, {k: v for k, v in entry.items()
                                                        if k not in ("error", "attempt")} | {"status": "done"})
                return StageResult(entry, skipped=True)
            entry = self.stage_entry(stage) or {}
            staging = self.staging_dir(stage)
            attempt = entry.get("attempt") or {}
            resumable = staging.is_dir() and attempt.get("fingerprint") == fp and not force
            if not resumable:
                if staging.exists():
                    shutil.rmtree(staging)
                staging.mkdir(parents=True)
                if entry.get("fingerprint") == fp and (not force or keep is not None):
                    self._seed_from_intact_outputs(stage, staging, keep if force else None)
            started = time.time()
            self.update_stage(stage, status="running", attempt={"fingerprint": fp, "started": started})
            try:
                result = dict(body(staging) or {})
            except Exception as err:
                message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                self.update_stage(stage, status="failed", error=f"{type(err).__name__}: {message}")
                raise
            outputs = [self._relative(stage, out) for out in result.pop("outputs", [])]
            partial = bool(result.pop("partial", False))
            hashes = {f"{stage}/{out}": file_sha256(staging / out) for out in outputs}
            self._swap_in(stage, staging)
            self._invalidate_downstream(stage)
            finished = time.time()
            entry = self._replace_entry(stage, {
                "status": "running" if partial else "done", "fingerprint": fp, "config": config, "depends": depends,
                "started": started, "finished": finished, "seconds": round(finished - started, 3),
                "outputs": list(hashes), "hashes": hashes,
                "inputs": {dep: (self.stage_entry(dep) or {}).get("fingerprint") for dep in depends},
                **result, "partial": partial,
            })
            if not partial:
                entry.pop("partial")
                self._replace_entry(stage, entry)
            return StageResult(entry, skipped=False)

    @staticmethod
    def _relative(stage: str, output: str | Path) -> str:
        text = str(output)
        return text[len(stage) + 1:] if text.startswith(f"{stage}/") else text

    def _seed_from_intact_outputs(self, stage: str, staging: Path, keep: Callable[[str], bool] | None) -> None:
        """Start a rebuild from the outputs that still verify (hard links: writes replace files)."""
        damaged = set(self.damaged_outputs(stage))
        for out in (self.stage_entry(stage) or {}).get("outputs", []):
            if out in damaged or (keep is not None and not keep(out)):
                continue
            target = staging / self._relative(stage, out)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(self.path / out, target)
            except OSError:
                shutil.copy2(self.path / out, target)

    def _swap_in(self, stage: str, staging: Path) -> None:
        """Make ``staging`` the stage's folder: two renames, recoverable if killed in between."""
        folder, old = self.path / stage, self.path / STAGING / f"{stage}.old"
        if old.exists():
            shutil.rmtree(old)
        if folder.exists():
            os.replace(folder, old)
        os.replace(staging, folder)
        if old.exists():
            shutil.rmtree(old)

    def _recover_swap(self, stage: str) -> None:
        """Undo a swap that a kill interrupted between its two renames."""
        folder, old = self.path / stage, self.path / STAGING / f"{stage}.old"
        if old.exists():
            if folder.exists():
                shutil.rmtree(old)
            else:
                os.replace(old, folder)

    def _replace_entry(self, stage: str, entry: dict[str, Any]) -> dict[str, Any]:
        manifest = self.manifest()
        manifest["stages"][stage] = entry
        self._write_manifest(manifest)
        return entry

    def _invalidate_downstream(self, stage: str) -> None:
        """Mark stages that read ``stage`` as stale: their fingerprints will no longer match."""
        manifest = self.manifest()
        changed = False
        for entry in manifest["stages"].values():
            if stage in entry.get("depends", []) and entry.get("status") == "done":
                entry["status"] = "stale"
                changed = True
        if changed:
            self._write_manifest(manifest)
