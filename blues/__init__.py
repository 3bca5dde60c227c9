"""Blues: Mixture-of-Experts language models trained with DeepSpeed."""
