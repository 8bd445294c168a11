"""nanofleet fleet side."""
