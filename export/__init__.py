"""nanofleet export side."""
