"""Bundled small models with known circuits, their task generators and their training."""
