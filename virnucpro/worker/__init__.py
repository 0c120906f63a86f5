"""The worker: one process per device that registers with the broker and runs the files it is given."""
