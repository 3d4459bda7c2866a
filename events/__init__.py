"""The bus: subject names, streams and consumers, NATS permissions, the NATS connection and
DLQ handling. No other package spells a subject."""
