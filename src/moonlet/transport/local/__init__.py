"""Same-process transport: ``transport.py`` (a transfer to one's own segment, a checked memmove or GPU copy)."""
