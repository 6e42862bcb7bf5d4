"""bridge-peft."""
