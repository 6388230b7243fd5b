"""The embedded stack behind ``ciliate up``: NATS, SQLite and every service as a process."""
