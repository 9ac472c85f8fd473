"""moeconsol: consolidate several fine-tuned MoE checkpoints into one shared expert bank."""

__version__ = "0.1.0"
