"""graft's gRPC server: graft.v1, tensorflow.serving, health and reflection."""
