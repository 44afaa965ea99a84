"""The Flower components of `prge federate` (defined in runtime_driver/federation/flower.py)."""
from runtime_driver.federation.flower import client_app, server_app

__all__ = ["client_app", "server_app"]
