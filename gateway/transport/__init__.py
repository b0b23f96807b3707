"""Adapters at the edge: the front protocol that routes a connection, the picows listener, the aiohttp app."""
