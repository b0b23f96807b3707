"""jmap-push-gateway: JMAP over WebSocket (RFC 8887) with push fan-out.

The package is wired together in `gateway.app`; the entry point is `python -m gateway` (`gateway.cli`).
"""

__version__ = "0.1.0"
