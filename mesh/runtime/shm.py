"""Shared-memory segments: files in ``SHM_DIR`` that processes of one machine map.

A segment holds one ``mesh.protocol.codec`` body and is named on the wire by a
``mesh.protocol.messages.Segment``. Three kinds share the directory, told apart by name:

- a store's object segments, ``OBJECT_PREFIX<pid>-<token>-<n>`` (``node.store``), which
  fetchers and workers on the machine map read-only;
- a client's uploads, ``UPLOAD_PREFIX<24 hex digits>``, which the node's store takes over
  (renames into its own names) and gives files back for, ``RETURN_PREFIX<the same digits>``,
  which the client takes back and writes its next uploads into (``UploadFiles``);
- an executor's pipe segments, ``mesh-<pid>-<token>-w<n>-...`` (``node.executor``).

A name another process sent is never trusted: ``segment_path`` refuses paths, and
``open_exact`` opens with ``O_NOFOLLOW | O_NONBLOCK`` and checks the open descriptor
(``fstat``, not the path, so it cannot be swapped between check and use): a regular file,
owned by this user or by root, of exactly the size announced. A link may point anywhere a
local user could put one, a FIFO would block ``open`` forever, and a mapping of a file that
its owner shrinks kills the reader with SIGBUS. Error messages name the file asked for and
nothing learned about others.

This module holds no state beyond a client's ``UploadFiles`` and imports nothing of Mesh
beyond ``mesh.errors``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import mmap
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from mesh.errors import RemoteProtocolError

SHM_DIR: Final = Path("/dev/shm") if os.path.isdir("/dev/shm") else Path(tempfile.gettempdir())
"""Where segments live: tmpfs on Linux, so they are memory, never disk."""

OBJECT_PREFIX: Final = "mesh-obj-"
"""Names of object-store segments: ``mesh-obj-<pid>-<token>-<n>``."""
UPLOAD_PREFIX: Final = "mesh-up-"
"""Names of a client's uploads: ``mesh-up-<24 hex digits>``."""
RETURN_PREFIX: Final = "mesh-ret-"
"""Names of files a store gives back for a client's upload: ``mesh-ret-<its 24 digits>``."""

_OBJECT_NAME: Final = re.compile(re.escape(OBJECT_PREFIX) + r"[0-9]{1,10}-[0-9a-f]{8}-[0-9]{1,20}")
_MAX_NAME: Final = 255
_BOOT_ID: Final = Path("/proc/sys/kernel/random/boot_id")
_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_MAP_POPULATE: Final[int] = getattr(mmap, "MAP_POPULATE", 0)
_F_SETLEASE: Final[int | None] = getattr(fcntl, "F_SETLEASE", None)


def host_id() -> str:
    """What identifies this machine's shared memory; "" where none can be shared.

    Two processes with the same value see the same files in ``SHM_DIR``: the kernel's boot
    id (one per running kernel) and the device and inode of the shared-memory directory
    (a container or mount namespace with a tmpfs of its own differs there).
    """
    try:
        boot = _BOOT_ID.read_text().strip()
        st = os.stat(SHM_DIR)
    except OSError:
        return ""
    if not boot:
        return ""
    return hashlib.sha256(f"{boot}:{st.st_dev}:{st.st_ino}".encode()).hexdigest()[:32]


def segment_path(name: str) -> str:
    """The path of segment ``name``; ``RemoteProtocolError`` (``bad-segment``) for a name
    that is no plain file name."""
    if not name or len(name) > _MAX_NAME or "/" in name or name.startswith("."):
        raise RemoteProtocolError(f"bad segment name {name!r}", reason="bad-segment")
    return os.path.join(SHM_DIR, name)


def open_exact(path: str | os.PathLike[str], nbytes: int, *, what: str) -> int:
    """A read-only descriptor of ``path``, a regular file of this user (or root) holding
    exactly ``nbytes``.

    ``what`` names the file in errors ("object segment x", "shared-memory upload y").
    Raises ``FileNotFoundError`` if it is gone, ``PermissionError`` if it is another user's
    (a node of another user keeps its segments private: take the bytes instead), and
    ``RemoteProtocolError`` (reason ``bad-segment``) for anything that is not such a file:
    a link, a FIFO, a directory, a file of another size.
    """
    if nbytes <= 0:
        raise RemoteProtocolError(
            f"{what}: announced size {nbytes} is not positive", reason="bad-segment"
        )
    try:
        fd = os.open(path, _FLAGS)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError | PermissionError):
            raise
        # ELOOP (a link), ENXIO (a FIFO or socket without a peer), EISDIR, ...
        raise RemoteProtocolError(f"{what} is not a regular file", reason="bad-segment") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RemoteProtocolError(f"{what} is not a regular file", reason="bad-segment")
        if st.st_uid not in (os.geteuid(), 0):
            raise PermissionError(errno.EACCES, f"{what} belongs to another user")
        if st.st_size != nbytes:
            raise RemoteProtocolError(
                f"{what} holds {st.st_size} bytes, not {nbytes}", reason="bad-segment"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


# ---------------------------------------------------------------------------------------
# Object segments: what a holder lends to fetchers and workers on its machine
# ---------------------------------------------------------------------------------------


def is_object_segment(name: str) -> bool:
    """Whether ``name`` is an object-store segment name (no path, the store's prefix)."""
    return _OBJECT_NAME.fullmatch(name) is not None


def map_object(name: str, nbytes: int) -> mmap.mmap:
    """Map object-store segment ``name`` read-only; it must hold exactly ``nbytes``.

    The mapping holds a shared ``flock`` on the file for as long as it exists (the lock
    belongs to the open file, which the mapping keeps): the store writes a segment's pages
    again for another object only once it can lock the file exclusively, so only once
    nothing maps it (``lock_shared``). Raises ``RemoteProtocolError`` (reason
    ``bad-segment``) for a name outside the store's prefix or a file of another size,
    ``FileNotFoundError`` when the segment is gone (its object was released) and
    ``PermissionError`` when it belongs to another user.
    """
    fd = _open_object(name, nbytes)
    try:
        lock_shared(fd, SHM_DIR / name)
        # Every page will be read: map them in one call rather than fault them one by one.
        return mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | _MAP_POPULATE, prot=mmap.PROT_READ)
    finally:
        os.close(fd)


def lock_shared(fd: int, path: str | os.PathLike[str]) -> None:
    """Mark ``fd``'s file as mapped by this process before mapping it: a shared ``flock``.

    A store recycles a released object's segment (under a new name) once it can lock it
    exclusively. Between this reader's ``open`` and its lock the segment may have been
    recycled already: then ``path`` no longer names the open file, and this raises
    ``FileNotFoundError`` as for a segment that is gone.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        same = os.stat(path).st_ino == os.fstat(fd).st_ino
    except (BlockingIOError, FileNotFoundError):
        same = False
    if not same:
        raise FileNotFoundError(errno.ENOENT, f"{os.fspath(path)} was released")


def held_by_none_else(fd: int) -> bool:
    """Whether ``fd``'s file has one name and no open file but ``fd`` (a read-only one):
    nothing else can write it, shrink it or reach it but through that name.

    A write lease can be had only when no other open file of the inode exists (writers on
    every kernel, readers too where the kernel counts them): it is taken and let go at once.
    False where leases are not to be had (another system, leases disabled).
    """
    if _F_SETLEASE is None or os.fstat(fd).st_nlink != 1:
        return False
    try:
        fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_WRLCK)
    except OSError:
        return False
    fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_UNLCK)
    return True


def unmapped(fd: int) -> bool:
    """Whether no process maps the file ``fd`` through ``map_object`` or ``lock_shared``
    (an exclusive ``flock`` can be had); the lock is let go again at once."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    fcntl.flock(fd, fcntl.LOCK_UN)
    return True


def check_object(name: str, nbytes: int) -> None:
    """Raise what ``map_object`` would, without mapping anything."""
    os.close(_open_object(name, nbytes))


def _open_object(name: str, nbytes: int) -> int:
    if not is_object_segment(name):
        raise RemoteProtocolError(f"bad object segment name {name!r}", reason="bad-segment")
    return open_exact(SHM_DIR / name, nbytes, what=f"object segment {name}")


# ---------------------------------------------------------------------------------------
# Segments a process makes and removes itself
# ---------------------------------------------------------------------------------------


def write_chunks(fd: int, chunks: Iterable[bytes | bytearray | memoryview]) -> None:
    """Write ``chunks`` back to back from the start of the file ``fd``."""
    offset = 0
    for chunk in chunks:
        view = memoryview(chunk).cast("B")
        while view.nbytes:
            written = os.pwrite(fd, view, offset)
            offset += written
            view = view[written:]


def write_segment(
    name: str, chunks: Iterable[bytes | bytearray | memoryview], size: int, *, reuse: bool = False
) -> None:
    """Write ``chunks`` back to back into segment ``name``, ``size`` bytes in all.

    ``reuse`` rewrites an existing segment in place (resizing it if needed); otherwise the
    segment must not exist yet.
    """
    path = segment_path(name)
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (0 if reuse else os.O_EXCL)
    fd = os.open(path, flags, 0o600)
    try:
        if os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)
        write_chunks(fd, chunks)
    except BaseException:
        os.close(fd)
        unlink(name)
        raise
    os.close(fd)


def map_segment(name: str, size: int, *, unlink_now: bool, populate: bool = False) -> mmap.mmap:
    """Map the first ``size`` bytes of segment ``name`` read-only.

    ``unlink_now`` removes the name at once (the mapping keeps the pages); ``populate`` maps
    every page up front, far cheaper than a fault per page when the reader will touch them
    all.
    """
    path = segment_path(name)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise RemoteProtocolError(f"segment {name} does not exist", reason="bad-segment") from None
    try:
        if size <= 0 or os.fstat(fd).st_size < size:
            raise RemoteProtocolError(f"segment {name} is short", reason="bad-segment")
        flags = mmap.MAP_SHARED | (_MAP_POPULATE if populate else 0)
        return mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
        if unlink_now:
            unlink(name)


def unlink(name: str) -> None:
    """Remove segment ``name`` if it is there (and is a file this process may remove)."""
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(SHM_DIR, name))


def remove_segments(prefix: str) -> int:
    """Unlink every segment whose name starts with ``prefix``; returns how many."""
    removed = 0
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return 0
    for name in names:
        if name.startswith(prefix):
            unlink(name)
            removed += 1
    return removed


class UploadFiles:
    """A client's uploads, written into files the node gave back.

    Fresh shared-memory pages cost the kernel a zeroing each; a file written again costs
    only the copy. An upload is a file of this client renamed to ``UPLOAD_PREFIX`` + 24 hex
    digits: one name, no descriptor left open, so the node can take it over as it is. For
    each upload the node may give a file of about its size back, named ``RETURN_PREFIX`` +
    the same digits (a segment it no longer uses, or the upload itself if it copied it); a
    later upload of about that size takes such a file back (a rename: only one taker wins)
    rather than making a new one. The returns of the last ``keep`` uploads are waited for;
    ``close`` removes those not taken back (and the orphan sweep does, for a client that
    died).
    """

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self._prefix = f"mesh-{os.getpid()}-{secrets.token_hex(4)}-up"
        self._n = 0
        self._sent: list[tuple[str, int]] = []
        """(digits, size) of uploads whose file may come back, oldest first."""
        self.reused = 0
        """Uploads written into a file given back."""

    def write(self, chunks: Iterable[bytes | bytearray | memoryview], size: int) -> str:
        """Write an upload of ``size`` bytes; the name to send. Raises ``OSError``."""
        self._n += 1
        own = f"{self._prefix}{self._n}"
        for i, (digits, nbytes) in enumerate(self._sent):
            if abs(nbytes - size) > size // 4:
                continue
            try:
                os.rename(SHM_DIR / f"{RETURN_PREFIX}{digits}", SHM_DIR / own)
            except OSError:
                continue  # not given back (yet)
            del self._sent[i]
            self.reused += 1
            break
        write_segment(own, chunks, size, reuse=True)
        digits = secrets.token_hex(12)
        upload = f"{UPLOAD_PREFIX}{digits}"
        try:
            os.rename(SHM_DIR / own, SHM_DIR / upload)
        except OSError:
            unlink(own)
            raise
        self._sent.append((digits, size))
        while len(self._sent) > self.keep:
            unlink(f"{RETURN_PREFIX}{self._sent.pop(0)[0]}")
        return upload

    def close(self) -> None:
        """Remove the files given back and not taken (an upload the node has not taken yet
        keeps its bytes)."""
        sent, self._sent = self._sent, []
        for digits, _ in sent:
            unlink(f"{RETURN_PREFIX}{digits}")
