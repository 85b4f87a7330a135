"""Opening a shared-memory file that another process named, without trusting the name.

Every process that maps a segment or reads an upload by name (the client, the daemon's
store, a worker) opens it here. The name may point anywhere a local user could put a link,
or at a FIFO that blocks ``open`` forever, or at a file of another size; so the file is opened
with ``O_NOFOLLOW | O_NONBLOCK`` and checked on the open descriptor (``fstat``, not the path,
so it cannot be swapped between check and use): a regular file, owned by this user or by
root, of exactly the size announced. Error messages name the file asked for and nothing
learned about others.

This module does no mapping and holds no state; it may not import anything beyond the
standard library and ``mesh.errors``.
"""

from __future__ import annotations

import errno
import os
import stat

from mesh.errors import RemoteProtocolError

_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


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
