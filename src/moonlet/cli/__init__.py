"""Command-line tools: ``moonlet bench``, ``moonlet info``, ``moonlet metadata-server``."""
