"""The store's exception type, and its kind for a write the file system refused."""


class StoreError(Exception):
    """A store that is missing, damaged, not writable, not a trakwomp store, or bound to other inputs."""


class StoreWriteError(StoreError):
    """A write the file system refused; `errno` says why (ENOSPC, EROFS, ENOENT, ...)."""

    def __init__(self, message: str, errno: int | None):
        super().__init__(message)
        self.errno = errno
