"""The gateway: applies a location's peer state to one real WireGuard interface and
publishes handshake statistics."""
