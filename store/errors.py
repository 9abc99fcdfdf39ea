"""The store's one exception type."""


class StoreError(Exception):
    """A store that is missing, damaged, not writable, not a trakwomp store, or bound to other inputs."""
