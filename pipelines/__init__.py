"""Inference for ECHO: `EchoPipeline` (diffusers), mp4 writing, batch rendering and the offline demo.

Importing this package registers `EchoPipeline` in the ``diffusers`` namespace, so that
``diffusers.DiffusionPipeline.from_pretrained(folder)`` resolves the ``"_class_name": "EchoPipeline"`` of a saved
pipeline's ``model_index.json`` to this class without any remote code.
"""

from echo.chunks import chunk_schedule

from .pipeline_echo import EchoPipeline
from .pipeline_output import EchoPipelineOutput

__all__ = ["EchoPipeline", "EchoPipelineOutput", "chunk_schedule"]
