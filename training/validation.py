"""Validation renders during training: the model being trained, wrapped in `pipelines.EchoPipeline`, animates the
first clip of the training set (its first avatar frame as the reference, its audio, the user's side in stage 2).

The pipeline shares the training modules (no copy); the audio encoder and feature extractor are loaded once from the
model description. The video, with the avatar's audio, goes to ``output_dir/validation/step-<N>.mp4``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .config import TrainConfig
from .modeling import TrainingModels


class ValidationRenderer:
    """Renders the validation clip with the current weights (call on the main process only).

    Args:
        config ([`TrainConfig`]): the run's config (``train.validation_inference_steps``, data size, stage).
        models ([`TrainingModels`]): the frozen parts and the scheduler.
        clip (`Path`): the prepared clip folder to animate.
    """

    def __init__(self, config: TrainConfig, models: TrainingModels, clip: Path):
        self.config = config
        self.models = models
        self.clip = Path(clip)
        self._audio = None

    def _audio_components(self, device: torch.device) -> tuple:
        if self._audio is None:
            from echo.components import load_components

            loaded = load_components(self.config.model.config, only=["audio_encoder", "feature_extractor"])
            self._audio = (loaded["audio_encoder"].to(device).eval(), loaded["feature_extractor"])
        return self._audio

    def _inputs(self) -> dict:
        from pipelines.video_io import load_wav, read_frames

        config, clip = self.config, self.clip
        meta = json.loads((clip / "meta.json").read_text())
        size = int(meta.get("size", config.data.resolution))
        num_frames, resolution = config.data.num_frames, config.data.resolution
        frames = read_frames(clip / "avatar.mp4")
        scale = resolution / size
        inputs = {
            "reference_image": frames[0],
            "reference_landmarks": np.load(clip / "avatar_landmarks.npy")[0] * scale,
            "avatar_audio": load_wav(clip / "avatar.wav"),
            "num_frames": num_frames,
            "height": resolution,
            "width": resolution,
            "num_frames_per_chunk": num_frames,
            "default_emotion": config.data.default_emotion,
            "user_video_size": config.data.user_video_size,
        }
        if not config.ablation.use_emotion:
            inputs["emotion"] = ""  # as in training: the empty prompt
        if frames.shape[1] != resolution:
            import PIL.Image

            inputs["reference_image"] = PIL.Image.fromarray(frames[0]).resize((resolution, resolution))
        if config.stage == 2:
            inputs["user_video"] = read_frames(clip / "user.mp4")
            inputs["user_audio"] = load_wav(clip / "user.wav")
            inputs["user_landmarks"] = np.load(clip / "user_landmarks.npy")
            if config.ablation.use_understanding and (clip / "user_omni.safetensors").is_file():
                from safetensors.torch import load_file

                inputs["understanding"] = load_file(str(clip / "user_omni.safetensors"))["hidden_states"].float()
            if (clip / "emotion.json").is_file():
                windows = json.loads((clip / "emotion.json").read_text()).get("windows", [])
                known = [w for w in windows if w["end_frame"] <= num_frames - 1]
                if known and config.ablation.use_emotion:
                    inputs["emotion"] = known[-1]["text"]
        return inputs

    @torch.no_grad()
    def __call__(self, module: torch.nn.Module, output_dir: Path, step: int, device: torch.device) -> Path:
        from pipelines import EchoPipeline
        from pipelines.video_io import write_mp4

        audio_encoder, feature_extractor = self._audio_components(device)
        pipeline = EchoPipeline(
            vae=self.models.vae,
            transformer=module.transformer,
            scheduler=self.models.scheduler,
            audio_encoder=audio_encoder,
            feature_extractor=feature_extractor,
            text_encoder=self.models.text_encoder,
            tokenizer=self.models.tokenizer,
            context_encoder=module.context_encoder,
        )
        inputs = self._inputs()
        was_training = module.training
        module.eval()
        try:
            frames = pipeline(
                **inputs,
                num_inference_steps=self.config.train.validation_inference_steps,
                generator=torch.Generator().manual_seed(self.config.seed),
                output_type="np",
            ).frames[0]
        finally:
            module.train(was_training)
        folder = Path(output_dir) / "validation"
        folder.mkdir(parents=True, exist_ok=True)
        return write_mp4(folder / f"step-{step}.mp4", frames, audio=inputs["avatar_audio"])
