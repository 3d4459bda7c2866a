"""The HTTP edge clients talk to: stateless; HTTP calls become NATS requests to the core."""
