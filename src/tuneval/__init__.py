"""tuneval: judge pre-trained language models by fine-tuning and scoring them.

The core package is plain Python; it never imports prefect (see ``flows/`` and ``tasks/``).
"""

__version__ = "0.1.0"
