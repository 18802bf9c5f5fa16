"""Weight quantization: schemes and packed layouts (schemes.py)."""
