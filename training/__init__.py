"""ECHO training (paper Sec. 3.3): `accelerate launch -m training.train --config configs/train/<stage>.yaml`.

- `training.config`: the YAML schema (nested dataclasses, strict keys, ``--set`` overrides, ``base:`` inheritance);
- `training.modeling`: components, LoRA adapters, trained modules, ``f_ref``, checkpoint files, FSDP wrap policy;
- `training.step`: one training step of either stage (the maths live in `echo.flow_matching` and `echo.losses`);
- `training.train`: the accelerate loop (checkpoints, exact resume, logging, validation renders);
- `training.validation`: validation renders with `pipelines.EchoPipeline`;
- `training.testing`: a tiny prepared training set for tests and benchmarks.
"""
