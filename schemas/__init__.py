"""Contracts in code: the params.yaml model, the Arrow schemas, the validation rules and reason codes."""
