"""One training path: `Trainer` (the loop), its optimizer step, optimizer and lr schedules,
run configuration, state, callback events and checkpoints."""
