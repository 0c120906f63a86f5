"""Pipeline helpers shared by workers and clients (weight table, file assignment)."""
