"""The proxy: one per machine, drives a codex app-server."""
