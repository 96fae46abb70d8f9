"""The manager: Telegram bot and WebSocket hub."""
