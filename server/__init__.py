"""server: see docs/ARCHITECTURE.md."""
