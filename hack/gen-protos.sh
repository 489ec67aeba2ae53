#!/usr/bin/env bash
# Regenerates the Python gRPC stubs under cs_p2p/api/ from protos/ with grpcio-tools.
# The stubs are committed so that `pip install .` works without grpcio-tools; run this
# after editing a .proto file (grpcio-tools is in the `dev` extra).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m grpc_tools.protoc -Iprotos \
  --python_out=. --pyi_out=. --grpc_python_out=. \
  protos/cs_p2p/api/content.proto protos/cs_p2p/api/cri.proto \
  protos/cs_p2p/api/types.proto protos/cs_p2p/api/diff.proto
echo "generated: $(ls cs_p2p/api/*_pb2*.py* | tr '\n' ' ')"
