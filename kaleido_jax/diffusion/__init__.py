"""Flow matching: sigma schedules and shifts, the training objective, samplers and guidance.
Never imports train/ or data/."""
