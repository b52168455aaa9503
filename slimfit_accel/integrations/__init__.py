"""Integrations with training stacks beyond plain torch optimizers (DeepSpeed ZeRO)."""
