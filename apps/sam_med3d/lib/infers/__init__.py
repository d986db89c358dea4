"""The interactive infer task and its request/session helpers."""
