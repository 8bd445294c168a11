"""nanofleet device side."""
