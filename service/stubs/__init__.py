"""Generated gRPC/protobuf code shared by the gRPC server and the Python client.

Never edit by hand: `make proto` (proto/generate.py) writes everything under this folder
from proto/graft/ and proto/thirdparty/.
"""
