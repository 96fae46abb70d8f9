"""codexnet: drive OpenAI Codex on several machines from one Telegram chat."""

__version__ = "0.1.0"
