"""bridge-recipes."""
