"""Versioned, immutable certificate files on a node (DESIGN §7).

Layout under the agent's data directory::

    certs/<name>/<generation>/cert.pem   (0600)
    certs/<name>/<generation>/key.pem    (0600, absent for names without a key)
    certs/<name>/current                 (the generation services use, one line)

A generation directory is built under a temporary name, checked there (the agent checks that
the pair parses and matches), and only then renamed into place: a generation on disk is
complete and its certificate and key match, or it is absent (after a power cut, one whose
stage had not answered yet may be torn: see :meth:`CertificateFiles.stage`). Removal is the
same in reverse: the directory is renamed out of the way (one atomic step) before it is
deleted. Files a service
reads are never overwritten. Leftovers of a crash mid-write or mid-delete (names starting with
a dot) are swept when the files are opened. Directories are 0700.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CertificateFiles", "GenerationPaths", "write_atomically"]

CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
CURRENT_FILE = "current"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a part.

    The temporary file is created with ``mode`` (never chmod-ed after the fact), written,
    fsync-ed, renamed over ``path``, and the directory is fsync-ed so the rename survives a crash.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    _write_new(tmp, data, mode)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _write_new(path: Path, data: bytes, mode: int = 0o600, *, sync: bool = True) -> None:
    """Create ``path`` with ``mode`` (it must not exist), write all of ``data``, fsync (unless
    the caller fsyncs it later, with :func:`_fsync_together`)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


_FSYNC_THREADS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fsync")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_together(paths: Sequence[Path]) -> None:
    """fsync every path at once, each in its own thread, and return when all are durable. The
    filesystem then commits them in one journal transaction instead of one after another: the
    same durability in about a third of the wall time on ext4 (docs/benchmarks.md)."""
    for done in [_FSYNC_THREADS.submit(_fsync_path, p) for p in paths]:
        done.result()


@dataclass(frozen=True)
class GenerationPaths:
    generation: int
    cert: Path
    key: Path | None


def _files(paths: GenerationPaths) -> list[Path]:
    return [paths.cert] if paths.key is None else [paths.cert, paths.key]


def _remove_tree(path: Path, *, durable: bool = True) -> None:
    """Delete directory ``path`` so that it is never seen half-deleted: rename it to a hidden
    name first (atomic), fsync the parent (unless not ``durable``), then delete it. A crash in
    between leaves a hidden directory that :class:`CertificateFiles` sweeps when it next opens.
    Without the fsync, a power cut may bring the directory back under its old name, possibly
    half-deleted: only for generations nothing reads again (pruned ones, see :meth:`prune`)."""
    if not path.exists():
        return
    trash = path.with_name(f".trash-{path.name}-{secrets.token_hex(4)}")
    os.rename(path, trash)
    if durable:
        _fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


class CertificateFiles:
    """The certificate files of one node. Not thread-safe, but for :meth:`current`, which
    :meth:`activate` may update from a worker thread: the agent serialises calls. One process
    owns a directory at a time (opening it sweeps crash leftovers); it keeps ``current`` in
    memory once read."""

    def __init__(self, root: Path, keep: int = 2) -> None:
        self.root = root / "certs"
        self.keep = keep
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._current: dict[str, int | None] = {}
        self._current_lock = threading.Lock()
        self._sweep()

    def _sweep(self) -> None:
        """Delete what a crash left half-done: hidden entries (staging directories, temporary
        files, directories being deleted) at the top level and in every name's directory."""
        for directory in [self.root, *(self.root / name for name in self.names())]:
            for entry in directory.iterdir():
                if not entry.name.startswith("."):
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)

    def _name_dir(self, name: str) -> Path:
        return self.root / name

    def paths(self, name: str, generation: int) -> GenerationPaths | None:
        """The files of ``generation``, or None when it is not on disk."""
        gen_dir = self._name_dir(name) / str(generation)
        cert = gen_dir / CERT_FILE
        if not cert.exists():
            return None
        key = gen_dir / KEY_FILE
        return GenerationPaths(generation, cert, key if key.exists() else None)

    def stage(
        self,
        name: str,
        generation: int,
        cert_pem: str,
        key_pem: str | None,
        check: Callable[[GenerationPaths], None] | None = None,
    ) -> GenerationPaths:
        """Durably write a new generation without touching what is served.

        ``check`` runs on the complete files while they are still under their temporary name;
        whatever it raises propagates and nothing is left on disk (e.g. the agent refuses a
        certificate and key that do not load together, so a mismatched pair never appears).

        Idempotent: staging a generation that is already on disk with the same files returns
        it. A staged generation with other content is left over from an update that was never
        decided (no service reads it), so it is replaced. The current generation is immutable:
        other content for it raises ``FileExistsError``.
        """
        existing = self.paths(name, generation)
        if existing is not None:
            same_key = (existing.key.read_text() if existing.key else None) == key_pem
            if existing.cert.read_text() == cert_pem and same_key:
                # An earlier stage of it may have ended before its fsync (the agent died).
                _fsync_together(
                    [*_files(existing), existing.cert.parent, existing.cert.parent.parent]
                )
                return existing
            if self.current(name) == generation:
                raise FileExistsError(f"{name} generation {generation} is current and differs")
            self.discard(name, generation)
        name_dir = self._name_dir(name)
        name_dir.mkdir(mode=0o700, exist_ok=True)
        tmp_dir = name_dir / f".{generation}.staging"
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir)
        tmp_dir.mkdir(mode=0o700)
        # The staging directory is the unit of atomicity (renamed into place below), so its
        # files need no temporary names of their own. Nothing is fsynced before the rename:
        # the files, the generation's directory and the name's directory are fsynced all at
        # once after it (one journal commit instead of two), before the stage answers. A power
        # cut before then may leave a torn generation that no one was told about: never
        # current (a commit follows an answered stage), and replaced by the next stage of that
        # generation (other content) or removed by an abort or the reconciler's tidy.
        _write_new(tmp_dir / CERT_FILE, cert_pem.encode(), sync=False)
        if key_pem is not None:
            _write_new(tmp_dir / KEY_FILE, key_pem.encode(), sync=False)
        if check is not None:
            key = tmp_dir / KEY_FILE
            try:
                check(
                    GenerationPaths(generation, tmp_dir / CERT_FILE, key if key.exists() else None)
                )
            except BaseException:
                shutil.rmtree(tmp_dir, ignore_errors=True)
                raise
        final = name_dir / str(generation)
        os.rename(tmp_dir, final)
        paths = GenerationPaths(
            generation, final / CERT_FILE, final / KEY_FILE if key_pem is not None else None
        )
        _fsync_together([*_files(paths), final, name_dir])
        return paths

    def discard(self, name: str, generation: int) -> None:
        """Remove a staged generation (abort). The current generation is never removed."""
        if self.current(name) == generation:
            return
        _remove_tree(self._name_dir(name) / str(generation))

    def current(self, name: str) -> int | None:
        # Read once, then kept: this object is the directory's only writer (see the class),
        # and the agent asks on every stage, commit, prune and status.
        # The lock orders a read that fills the cache against activate() in a worker thread.
        with self._current_lock:
            if name not in self._current:
                try:
                    text = (self._name_dir(name) / CURRENT_FILE).read_text()
                    self._current[name] = int(text.strip())
                except (FileNotFoundError, ValueError):
                    self._current[name] = None
            return self._current[name]

    def activate(self, name: str, generation: int, *, prune: bool = True) -> GenerationPaths:
        """Make ``generation`` current, then (unless the caller does it later with
        :meth:`prune`) prune all but the newest ``keep`` generations."""
        paths = self.paths(name, generation)
        if paths is None:
            raise FileNotFoundError(f"{name} generation {generation} is not staged")
        try:
            write_atomically(self._name_dir(name) / CURRENT_FILE, f"{generation}\n".encode())
        except BaseException:
            with self._current_lock:
                self._current.pop(name, None)  # old or new on disk: read it again
            raise
        with self._current_lock:
            self._current[name] = generation
        if prune:
            self.prune(name)
        return paths

    def prune(self, name: str) -> None:
        """Delete the generations older than the newest ``keep`` up to the current one (the
        current one and the previous, for rollback). Staged generations above it stay."""
        current = self.current(name)
        if current is None:
            return
        older = [g for g in self.generations(name) if g < current]
        # Not durable: a pruned generation that a power cut brings back (even half-deleted)
        # is older than the previous one, which nothing reads, and the next prune removes it.
        for generation in older[: max(0, len(older) - (self.keep - 1))]:
            _remove_tree(self._name_dir(name) / str(generation), durable=False)

    def generations(self, name: str) -> list[int]:
        name_dir = self._name_dir(name)
        if not name_dir.is_dir():
            return []
        return sorted(int(p.name) for p in name_dir.iterdir() if p.name.isdigit())

    def names(self) -> list[str]:
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )

    def remove(self, name: str) -> None:
        """Remove every file of ``name`` (DELETE of an optional certificate)."""
        with self._current_lock:
            self._current.pop(name, None)
        _remove_tree(self._name_dir(name))
