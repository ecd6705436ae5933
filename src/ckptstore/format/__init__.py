"""The on-disk format: names, the state tree encoding, manifests and pack files (spec in docs/format.md)."""
