"""moeconsol: consolidate several fine-tuned MoE checkpoints into one shared expert bank.

The pipeline, one subpackage per stage:

    io/             read checkpoints and data, write files atomically
    architectures/  what each MoE family's tensor names mean (records, layouts)
    analysis/       expert similarity, the analyze report, calibration activations
    consolidate/    group experts into a bank (one planner per mode), the merge pipeline
    artifact/       the consolidated artifact: manifest, reader, verify, export, encodings
    serving/        runtime, engine, OpenAI server, Ray Serve
    quality/        perplexity and accuracy, eval and sweep
    cli/            the `moeconsol` command

The Python API is the names below (imported when first used); docs/architecture.md lists them.
"""

from ._faces import face

__version__ = "0.1.0"

__getattr__, __dir__, __all__ = face(
    __name__,
    {
        "io.checkpoint": ["open_checkpoints"],
        "analysis.report": ["analyze_models", "report_json", "write_heatmap"],
        "consolidate.settings": ["MergeSettings"],
        "consolidate.pipeline": ["merge"],
        "artifact.reader": ["Artifact"],
        "artifact.export": ["export_model"],
        "artifact.verify": ["verify_artifact"],
        "serving.runtime": ["Runtime"],
        "serving.variants": ["VariantSet"],
        "serving.engine": ["Engine", "Request", "GenerationSettings", "complete"],
        "serving.crossvariant": ["ServingMode"],
        "quality.evaluate": ["eval_artifact", "sweep"],
    },
)
