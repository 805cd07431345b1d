"""pytest fixtures that start in-memory clusters (filled in by issue 2)."""
