"""Adapters that let other training loops drive finetune's strategies (`lightning`: install
the `[lightning]` extra). Import the submodule itself; this package imports nothing heavy."""
