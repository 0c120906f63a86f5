"""GPU weights from experience: throughput-log parsing, the refinement fit, and the `weights` command."""
