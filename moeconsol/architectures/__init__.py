"""What each MoE architecture's tensor names mean, kept as data: one `Architecture` record per
family in `ARCHITECTURES`, its on-disk `Layout`s (some derived from transformers' checkpoint
conversion mapping and shipped in `derived_layouts`), and canonical expert parts."""

from .._faces import face

__getattr__, __dir__, __all__ = face(
    __name__,
    {
        "layouts": ["ARCHITECTURES", "Architecture", "Layout", "architecture", "detect_layout", "supported"],
    },
)
