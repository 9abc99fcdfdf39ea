"""The on-disk layout of a trakwomp store: a Zarr v3 group with a manifest, arrays and done markers."""

from trakwomp.store.zarr_store import FORMAT_VERSION, Store, StoreError

__all__ = ["FORMAT_VERSION", "Store", "StoreError"]
