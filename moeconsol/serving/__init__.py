"""Serving every variant from one resident expert bank: the runtime (swap the non-expert tensors
in place, or keep every variant resident for cross-variant batching), the generation engine,
the OpenAI-compatible HTTP server, and the same API scaled out on Ray Serve."""

from .._faces import face

__getattr__, __dir__, __all__ = face(
    __name__,
    {
        "runtime": ["Runtime", "SwapReport", "ResidentBytes"],
        "variants": ["VariantSet", "Family"],
        "engine": ["Engine", "Request", "GenerationSettings", "complete"],
        "crossvariant": ["ServingMode"],
        "server": ["create_app", "serve"],
    },
)
