"""Consolidating N checkpoints into one artifact: grouping experts into a shared bank, the
planners of each mode, the merging baselines, compressed expert corrections where bytes allow,
and the pipeline that streams it all to disk."""

from .._faces import face

__getattr__, __dir__, __all__ = face(
    __name__,
    {
        "settings": ["MergeSettings", "Mode"],
        "pipeline": ["MergeResult", "merge"],
    },
)
