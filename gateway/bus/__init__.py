"""Event-bus port and its adapters: `memory` (embedded default) and `amqp` (RabbitMQ, James-compatible)."""
