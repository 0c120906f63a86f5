"""The virnucpro broker: scheduler core, wire protocol and ZeroMQ server (never imports torch)."""
