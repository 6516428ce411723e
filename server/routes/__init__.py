"""One router per resource: embed, vectors (index and search), tasks, health."""
