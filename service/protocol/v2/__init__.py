"""The Open Inference Protocol (KServe V2): REST routes, the gRPC servicer and their codec."""
