"""Generated from protos/depthd/v1/depth.proto by scripts/generate-protos: do not edit."""
