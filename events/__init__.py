"""The bus: subject names, streams and consumers, the NATS connection, DLQ handling and
the embedded nats-server launcher. No other package spells a subject."""
