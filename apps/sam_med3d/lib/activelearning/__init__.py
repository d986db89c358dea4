"""Active-learning strategy and scoring that use the model."""
