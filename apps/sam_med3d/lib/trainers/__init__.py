"""The fine-tuning train task."""
