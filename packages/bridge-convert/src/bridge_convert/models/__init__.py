"""One module per model family; each defines a ModelBridge table. The registry lists them."""
