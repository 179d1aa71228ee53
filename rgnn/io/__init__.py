"""Files: a local path or an object-store URI (storage, fsspec), and checkpoints (one payload, written
and read by rgnn.io.checkpoint, loaded weights-only). Imports no Ray."""
