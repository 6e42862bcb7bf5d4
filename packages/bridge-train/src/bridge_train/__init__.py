"""bridge-train."""
