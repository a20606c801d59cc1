"""curate's framework: catalog, shard I/O, manifests, run store, fingerprints, config, CLI."""

__version__ = "0.1.0"
