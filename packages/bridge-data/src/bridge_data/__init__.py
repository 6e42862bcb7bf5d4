"""bridge-data."""
