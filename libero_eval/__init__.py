"""The engine: episode specs, seeding, the episode loop, the result store, summaries and the CLI."""
