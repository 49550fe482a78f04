"""graft's gRPC server: graft.v1, tensorflow.serving, inference (V2), health and reflection."""
