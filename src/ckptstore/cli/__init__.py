"""The `ckpt` command line, one module per command group."""
