"""Other engines' APIs on top of moonlet: ``mooncake.py`` (Mooncake's Python TransferEngine)."""
