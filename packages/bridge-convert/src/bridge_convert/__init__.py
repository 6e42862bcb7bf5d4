"""bridge-convert."""
