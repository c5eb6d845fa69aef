"""One formatter module per wire format: how it writes a request's typed events (chat.relay)."""
