"""Integrations with training frameworks; each lives in its own module and imports its framework
only there (`spion_fx.integrations.hf` needs transformers and accelerate: ``pip install spion-fx[hf]``)."""
