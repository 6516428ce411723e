"""clients: see docs/ARCHITECTURE.md."""
