"""Measuring experts: similarity matrices per layer (cosine, L2, linear CKA), the analyze report
(tables, JSON, heatmaps), and each variant's own activations on calibration text with the
output error of serving a slot with another expert."""

from .._faces import face

__getattr__, __dir__, __all__ = face(
    __name__,
    {
        "report": ["AnalysisReport", "analyze_models", "report_json", "write_heatmap"],
        "similarity": ["METRICS", "layer_similarity"],
        "calibration": ["capture", "substitution_costs"],
    },
)
