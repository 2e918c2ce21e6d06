"""Prefect orchestration: thin flows whose tasks run the DVC stages (the stages themselves import no Prefect)."""
