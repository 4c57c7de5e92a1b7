"""The export stage: checkpoint -> verified ONNX + manifest (`onnx_export`), its fp16 / int8 / ORT-format variants
(`variants`), verification of existing files (`verify`), the per-variant size/speed/accuracy report (`report`)
and the torch-vs-onnxruntime benchmark (`bench`). See docs/export.md."""
