"""The consolidated artifact on disk: its manifest (validated, typed), the reader the runtime
uses, verification, export of any variant as a standard checkpoint, and the two encodings it
stores: lossy compressed expert corrections and the lossless encoding of non-expert tensors."""

from .._faces import face

__getattr__, __dir__, __all__ = face(
    __name__,
    {
        "reader": ["Artifact"],
        "overview": ["summary"],
        "verify": ["verify_artifact"],
        "export": ["export_model"],
        "manifest": ["Manifest"],
    },
)
