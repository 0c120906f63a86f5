"""The client commands: `embed` submits one stage's files as a job, `predict` runs a whole sample."""
