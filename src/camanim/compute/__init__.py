"""Compute: tensors in, tensors or small typed results out.

Models and their inputs (:mod:`.models`, :mod:`.images`, :mod:`.devices`), the layers of a forward pass
(:mod:`.layers`), the one-pass capture (:mod:`.capture`), targets (:mod:`.targets`), the CAM methods
(:mod:`.methods`), normalisation ranges (:mod:`.normalize`) and faithfulness metrics (:mod:`.metrics`).
Nothing here writes a file, draws a colour or imports from the floors above (pipelines, outputs, cli).
"""
