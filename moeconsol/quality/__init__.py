"""What consolidation costs in quality: perplexity, seq2seq accuracy and retained fine-tuning
gain (`metrics`), and `eval` / `sweep` over originals, consolidated variants and baselines."""

from .._faces import face

__getattr__, __dir__, __all__ = face(
    __name__,
    {
        "metrics": ["perplexity", "seq2seq_accuracy", "retained_gain"],
        "evaluate": ["EvalSettings", "eval_artifact", "sweep"],
    },
)
