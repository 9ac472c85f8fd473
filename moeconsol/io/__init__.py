"""Reading and writing files: checkpoints (`NAME=PATH`, local or hub cache, safetensors only),
safetensors headers and tensor reads by byte range, digests of raw bytes, atomic sharded
writes, the user's data files, and the rules for names and paths that come from outside."""

from .._faces import face

__getattr__, __dir__, __all__ = face(
    __name__,
    {
        "checkpoint": ["Checkpoint", "open_checkpoint", "open_checkpoints", "check_compatible", "parse_model_ref"],
        "safetensors_file": ["TensorInfo", "read_header", "read_tensor", "read_into"],
        "digest": ["tensor_digest", "range_digest"],
        "writer": ["ShardedWriter", "TensorSpec", "atomic_directory"],
        "data": ["read_text_data", "read_seq2seq_data"],
    },
)
