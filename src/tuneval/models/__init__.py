"""Pre-trained models: loading backbones and tokenizers, and their fingerprints."""
