"""Validation renders during training: the model being trained, wrapped in `pipelines.EchoPipeline`, animates the
first clip of the training set (its first avatar frame as the reference, its audio, the user's side in stage 2).

The pipeline shares the training modules (no copy); the audio encoder and feature extractor are loaded once from the
model description. It carries the run's settings (`training.config.settings_from_config`: resolution, window = chunk
length, motion frames, user video size, text length, default emotion, the LAU switch), so it renders with the defaults
the exported model will have and through the encodings the training step uses (`echo.encoding`). The video, with the
avatar's audio, goes to ``output_dir/validation/step-<N>.mp4`` and to the run's trackers (`log_validation`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from echo import clip_format
from echo.audio import FPS, SAMPLE_RATE
from echo.components import load_components
from pipelines import EchoPipeline
from pipelines.video_io import to_uint8_frames, write_mp4

from .config import TrainConfig, settings_from_config
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
        self.settings = settings_from_config(config).replace(
            num_inference_steps=config.train.validation_inference_steps
        )
        self._audio = None

    def _audio_components(self, device: torch.device) -> tuple:
        if self._audio is None:
            loaded = load_components(self.config.model.config, only=["audio_encoder", "feature_extractor"])
            self._audio = (loaded["audio_encoder"].to(device).eval(), loaded["feature_extractor"])
        return self._audio

    def _inputs(self) -> dict:
        config, clip = self.config, self.clip
        meta = clip_format.read_meta(clip)
        num_frames = config.data.num_frames
        all_frames = range(meta["num_frames"])
        frames = clip_format.read_video_frames(clip / clip_format.video_name("avatar"), all_frames)
        # Size, chunk length, user video size, default emotion and the LAU switch ("" prompt without LAU) come from
        # the pipeline's settings; the reference landmarks are in pixels of the reference frame, resized with it.
        inputs = {
            "reference_image": frames[0],
            "reference_landmarks": clip_format.read_landmarks(clip, "avatar")[0],
            "avatar_audio": clip_format.read_clip_wav(clip, "avatar"),
            "num_frames": num_frames,
        }
        if config.stage == 2:
            inputs["user_video"] = clip_format.read_video_frames(clip / clip_format.video_name("user"), all_frames)
            inputs["user_audio"] = clip_format.read_clip_wav(clip, "user")
            inputs["user_landmarks"] = clip_format.read_landmarks(clip, "user")
            if config.ablation.use_understanding and (clip / clip_format.USER_OMNI).is_file():
                index = clip_format.read_understanding_index(clip, meta["num_frames"])
                known = np.nonzero(index.end_frames <= num_frames - 1)[0]
                if len(index.end_frames):  # a monitor render: without an entry by the chunk's end, the first one
                    entry = int(known[-1]) if len(known) else 0
                    inputs["understanding"] = clip_format.read_understanding_entry(index, entry)
            if config.ablation.use_emotion:
                windows = clip_format.read_emotion_windows(clip)
                inputs["emotion"] = clip_format.emotion_text_at(windows, num_frames - 1, config.data.default_emotion)
        return inputs

    @torch.no_grad()
    def __call__(
        self, module: torch.nn.Module, output_dir: Path, step: int, device: torch.device, trackers: Sequence = ()
    ) -> Path:
        """Render with ``module``'s current weights into ``output_dir/validation/step-<step>.mp4`` and send the video
        to ``trackers`` (`log_validation`)."""

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
            settings=self.settings,
            image_encoder=self.models.image_encoder,
            image_processor=self.models.image_processor,
        )
        inputs = self._inputs()
        was_training = module.training
        module.eval()
        try:
            frames = pipeline(
                **inputs,
                generator=torch.Generator().manual_seed(self.config.seed),
                output_type="np",
                sampling_rate=SAMPLE_RATE,  # a prepared clip's audio is at the model's rate
                frame_inputs=False,  # a prepared clip's frames already are echo-prep's head crops
            ).frames[0]
        finally:
            module.train(was_training)
        folder = Path(output_dir) / "validation"
        folder.mkdir(parents=True, exist_ok=True)
        path = write_mp4(folder / f"step-{step}.mp4", frames, audio=inputs["avatar_audio"])
        log_validation(trackers, path, to_uint8_frames(frames), step, FPS)
        return path


def log_validation(trackers: Sequence, path: Path, frames: np.ndarray, step: int, fps: float) -> None:
    """Send a validation render to accelerate's trackers, as diffusers' training examples do: tensorboard gets the
    video (``add_video``, which needs moviepy) or, without moviepy, its first, middle and last frames (``add_images``);
    wandb gets the mp4 with its audio (``wandb.Video``). Other trackers get nothing (the mp4 is on disk).

    Args:
        trackers (`Sequence[accelerate.tracking.GeneralTracker]`): ``accelerator.trackers``.
        path (`Path`): the written mp4.
        frames (`np.ndarray` of shape `(T, H, W, 3)`, uint8): its frames.
        step (`int`): the optimizer step.
        fps (`float`): its frame rate.
    """
    import importlib.util

    for tracker in trackers:
        if tracker.name == "tensorboard":
            if importlib.util.find_spec("moviepy") is not None:
                video = torch.from_numpy(frames).permute(0, 3, 1, 2)[None]  # 1, T, 3, H, W
                tracker.writer.add_video("validation/video", video, step, fps=fps)
            else:
                picks = sorted({0, len(frames) // 2, len(frames) - 1})
                tracker.writer.add_images("validation/frames", frames[picks], step, dataformats="NHWC")
            tracker.writer.flush()
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": wandb.Video(str(path), format="mp4")}, step=step)
