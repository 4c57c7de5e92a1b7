"""The ground floor: contracts every stage shares (manifests, preprocessing, the onnxruntime wrapper, metrics).

Nothing here imports a stage, and nothing here imports torch: the serving side runs on this package alone.
"""
