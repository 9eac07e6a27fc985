"""What the machine decides: precision and memory layout (timed once per machine), malloc
tuning, and data-parallel processes under torchrun."""
