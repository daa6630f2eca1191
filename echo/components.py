"""Build or load every component of an ECHO model from one YAML (or dict) description.

A model description (``configs/models/*.yaml``) has one section per component:

```yaml
vae:            {class: AutoencoderKLWan, pretrained: Wan-AI/Wan2.1-T2V-1.3B-Diffusers, subfolder: vae}
transformer:    {class: EchoTransformer3DModel, from_wan: Wan-AI/Wan2.1-T2V-1.3B-Diffusers, subfolder: transformer,
                 config: {audio_dim: 768, audio_num_layers: 13}}
scheduler:      {class: FlowMatchEulerDiscreteScheduler, config: {shift: 5.0}}
audio_encoder:  {class: Wav2Vec2Model, config: {hidden_size: 32, ...}}        # tiny, random weights
...
```

Each section names a ``class`` (see `COMPONENT_CLASSES`) and exactly one source:

- ``pretrained: <local folder or hub id>`` (+ optional ``subfolder``): loaded with the class's own
  ``from_pretrained``. Hub ids resolve from the local Hugging Face cache only (``local_files_only=True``) unless
  ``load_components(..., allow_download=True)`` or the top-level key ``allow_download: true`` is given. Model weights
  are read from safetensors only (``use_safetensors=True``): a folder holding only ``pytorch_model.bin`` /
  ``diffusion_pytorch_model.bin`` (pickles, which can run code when loaded) is refused, and no custom code is run
  (``trust_remote_code=False``).
- ``from_wan: <folder or hub id>`` (transformer only): `EchoTransformer3DModel.from_wan`, every Wan weight loaded under
  its own name, the ECHO modules added so that the model starts as the Wan model (drawn from the section's ``seed``);
  ``config`` holds the ECHO options.
- ``config: {...}``: the component is built from this config with random weights drawn from
  ``torch.manual_seed(seed)`` (``seed`` per section, defaults to the top-level ``seed``, itself 0), so tiny models are
  reproducible whatever the build order. Tokenizers built from ``config`` are small offline Unigram vocabularies
  (`build_tiny_tokenizer`).

The scheduler: a ``pretrained`` scheduler section loads the class its folder's ``scheduler_config.json`` names
(``_class_name``, as `DiffusionPipeline.from_pretrained` does; Wan's diffusers folders hold a UniPCMultistepScheduler
in flow mode with ``flow_shift`` 3.0 at 480p), so ``class`` may be omitted there; a ``class`` that differs from the
folder's is refused, since loading one scheduler's config as another drops its settings. Its ``config`` overrides
settings of that class (``flow_shift`` for UniPC, ``shift`` for FlowMatchEuler; a key the class does not take is an
error). A scheduler built from ``config`` alone is exactly the class and settings named. Either way a scheduler that
cannot sample the flow-matching generator is refused (`echo.flow_matching.check_flow_scheduler`).

Precision: a model section's ``torch_dtype`` (``float32``, ``bfloat16``, ``float16``), else the top-level
``torch_dtype``, else float32; the caller's ``torch_dtype`` overrides both (`load_components`). A real description
sets ``torch_dtype: bfloat16`` with ``torch_dtype: float32`` on its VAE, as diffusers' Wan examples load them. Every
weight-bearing component is built on the meta device and loaded straight into its dtype (``low_cpu_mem_usage``;
`from_wan` reads one tensor at a time), so loading needs about the loaded model's size in host memory, not a float32
copy beside it.

A top-level ``settings:`` mapping holds the `echo.settings.EchoSettings` the model is used with (resolution, frames
per chunk, motion frames, user video size, sampling defaults); `load_components` validates it and returns it as a
plain dict under ``"settings"``, so ``EchoPipeline(**load_components(path))`` carries it into ``model_index.json``.

`load_components` checks that the seams agree (audio width and layer count between the wav2vec2 encoder, the
generator and the LCU; the text width between the T5/UMT5 encoder and the generator; the LCU's output width and the
generator's ``context_dim``; the tokenizer's vocabulary and the text encoder's embedding table) and raises a
`ValueError` naming both keys otherwise.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import os
import string
from pathlib import Path
from typing import Any

import torch

from .flow_matching import check_flow_scheduler
from .settings import EchoSettings

# Component name → the classes a section may name, as (module, class). Order is the build order.
COMPONENT_CLASSES: dict[str, dict[str, tuple[str, str]]] = {
    "vae": {"AutoencoderKLWan": ("diffusers", "AutoencoderKLWan")},
    "transformer": {"EchoTransformer3DModel": ("echo.transformer_echo", "EchoTransformer3DModel")},
    "scheduler": {
        "FlowMatchEulerDiscreteScheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
        "UniPCMultistepScheduler": ("diffusers", "UniPCMultistepScheduler"),
    },
    "audio_encoder": {"Wav2Vec2Model": ("transformers", "Wav2Vec2Model")},
    "feature_extractor": {"Wav2Vec2FeatureExtractor": ("transformers", "Wav2Vec2FeatureExtractor")},
    "text_encoder": {
        "UMT5EncoderModel": ("transformers", "UMT5EncoderModel"),
        "T5EncoderModel": ("transformers", "T5EncoderModel"),
    },
    "tokenizer": {
        "PreTrainedTokenizerFast": ("transformers", "PreTrainedTokenizerFast"),
        "AutoTokenizer": ("transformers", "AutoTokenizer"),
        "T5TokenizerFast": ("transformers", "T5TokenizerFast"),
    },
    "context_encoder": {"LongRangeContextEncoder": ("echo.lcu", "LongRangeContextEncoder")},
    # Optional, I2V bases only (Wan2.1-I2V): the CLIP vision encoder of the reference image and its processor.
    "image_encoder": {"CLIPVisionModel": ("transformers", "CLIPVisionModel")},
    "image_processor": {"CLIPImageProcessor": ("transformers", "CLIPImageProcessor")},
}

# transformers config classes for the `config:` route.
_TRANSFORMERS_CONFIGS = {
    "Wav2Vec2Model": "Wav2Vec2Config",
    "UMT5EncoderModel": "UMT5Config",
    "T5EncoderModel": "T5Config",
    "CLIPVisionModel": "CLIPVisionConfig",
}

_MODEL_COMPONENTS = ("vae", "transformer", "audio_encoder", "text_encoder", "context_encoder", "image_encoder")

# Values a description's `torch_dtype` keys may take.
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Words of the tiny tokenizer beyond single characters: the emotion vocabulary of the demo and tests.
TINY_TOKENIZER_WORDS = (
    "the",
    "a",
    "an",
    "and",
    "is",
    "are",
    "of",
    "to",
    "in",
    "with",
    "at",
    "while",
    "as",
    "avatar",
    "user",
    "listens",
    "listening",
    "speaks",
    "speaking",
    "calm",
    "happy",
    "joyful",
    "content",
    "neutral",
    "sad",
    "curious",
    "attentive",
    "surprised",
    "amused",
    "interested",
    "engaged",
    "relaxed",
    "warm",
    "smile",
    "smiles",
    "nods",
    "face",
    "expression",
    "eyes",
    "mouth",
    "emotion",
    "feels",
    "looks",
    "slightly",
    "very",
    "gently",
)


def build_tiny_tokenizer(words: list[str] | tuple[str, ...] = TINY_TOKENIZER_WORDS, model_max_length: int = 512):
    r"""A small T5-style tokenizer built offline: a Unigram model over characters plus whole ``words``.

    Special tokens follow T5: ``<pad>`` = 0, ``</s>`` = 1 (appended to every sequence), ``<unk>`` = 2. Text is NFKC
    normalised and lower-cased; words are prefixed with the SentencePiece meta-space ``▁``. Any lower-case ASCII text
    is encoded without ``<unk>`` (unknown words fall back to characters).

    Args:
        words (`list[str]`, defaults to `TINY_TOKENIZER_WORDS`): whole-word pieces of the vocabulary.
        model_max_length (`int`, defaults to 512): the tokenizer's maximum sequence length.

    Returns:
        `transformers.PreTrainedTokenizerFast` with ``len(tokenizer) == 4 + 68 + len(set(words))``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = string.ascii_lowercase + string.digits + string.punctuation
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -4.0) for c in chars] + [("▁" + c, -3.0) for c in string.ascii_lowercase]
    seen = {p for p, _ in pieces}
    for word in words:
        piece = "▁" + word.lower()
        if piece not in seen:
            pieces.append((piece, -1.0))
            seen.add(piece)

    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )


def read_yaml(path: str | os.PathLike, what: str = "YAML file") -> Any:
    """Parse a YAML file with the safe loader (plain data only: nothing in the file can construct an object or run
    code). A syntax error, or a file that is not text, is a `ValueError` naming ``what``, the file, line and column.
    """
    import yaml

    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = ", ".join(part for part in (error.context, error.problem) if part)
        raise ValueError(f"{what} {str(path)!r} is not valid YAML: {problem}{where}.") from error
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"{what} {str(path)!r} is not valid YAML ({error}).") from error


def load_model_config(config: str | Path | dict) -> dict:
    """Read a model description: a YAML path or an already parsed dict (deep-copied)."""
    if isinstance(config, dict):
        return copy.deepcopy(config)
    path = Path(config)
    if not path.is_file():
        raise ValueError(
            f"model config {str(path)!r} is not a file; expected a YAML file such as configs/models/tiny.yaml"
        )
    loaded = read_yaml(path, "model config")
    if not isinstance(loaded, dict):
        raise ValueError(f"model config {str(path)!r} holds a {type(loaded).__name__}, expected a mapping of sections")
    return loaded


def _import_class(name: str, section: str):
    classes = COMPONENT_CLASSES[section]
    if name not in classes:
        raise ValueError(f"section {section!r} names class {name!r}; expected one of {sorted(classes)}")
    module, attr = classes[name]
    return getattr(importlib.import_module(module), attr)


def _from_pretrained(cls, source: str, section: str, load_kwargs: dict):
    """``cls.from_pretrained(source, **load_kwargs)``; a folder without safetensors weights is refused, naming the
    section and how to convert the pickled weights it holds."""
    try:
        return cls.from_pretrained(source, **load_kwargs)
    except OSError as error:
        folder = Path(source) / load_kwargs.get("subfolder", "")
        pickled = sorted(p.name for p in folder.glob("*.bin")) if folder.is_dir() else []
        if not load_kwargs.get("use_safetensors") or not pickled:
            raise
        raise OSError(
            f"section {section!r}: {str(folder)!r} holds model weights only as {pickled}, a pickle format whose "
            "loading can run code; ECHO loads safetensors only. Convert them once from a source you trust (load "
            "the model there and `save_pretrained(..., safe_serialization=True)`)."
        ) from error


def _parse_dtype(value: Any, where: str) -> torch.dtype:
    """A dtype from a description value (``bfloat16``, ``torch.float32``, ...) or a `torch.dtype`."""
    if isinstance(value, torch.dtype) and value in _DTYPES.values():
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in _DTYPES:
        return _DTYPES[value.removeprefix("torch.")]
    raise ValueError(f"{where} is {value!r}; expected one of {sorted(_DTYPES)}")


def _section_dtype(section: str, spec: Any, description: dict, torch_dtype) -> torch.dtype | None:
    """The dtype of one section (`None` for sections without weights): the caller's ``torch_dtype`` (a dtype for
    every section, or a dict by section name with an optional ``"default"``), else the section's ``torch_dtype``,
    else the description's top-level ``torch_dtype``, else float32."""
    given = isinstance(spec, dict) and "torch_dtype" in spec
    if section not in _MODEL_COMPONENTS:
        if given:
            raise ValueError(f"section {section!r} sets 'torch_dtype' but a {section} has no weights")
        return None
    if isinstance(torch_dtype, dict):
        if section in torch_dtype or "default" in torch_dtype:
            value = torch_dtype.get(section, torch_dtype.get("default"))
            return _parse_dtype(value, f"torch_dtype[{section!r}]")
    elif torch_dtype is not None:
        return _parse_dtype(torch_dtype, "torch_dtype")
    if given:
        return _parse_dtype(spec["torch_dtype"], f"section {section!r} torch_dtype")
    return _parse_dtype(description.get("torch_dtype", "float32"), "model config torch_dtype")


def _cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast a freshly built model as ``from_pretrained`` loads one in ``dtype``: diffusers models keep their
    ``_keep_in_fp32_modules`` in float32; transformers models keep ``_keep_in_fp32_modules_strict`` (and, in float16,
    ``_keep_in_fp32_modules``)."""
    if type(model).__module__.startswith("transformers."):
        keep = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
        if dtype == torch.float16:
            keep |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    else:
        keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point():
            target = torch.float32 if keep & set(name.split(".")) else dtype
            if tensor.dtype != target:
                tensor.data = tensor.data.to(target)
    return model


def _saved_scheduler_class(spec: dict, allow_download: bool) -> str:
    """The class a ``pretrained`` scheduler section loads: the ``_class_name`` of the folder's
    ``scheduler_config.json`` (what `DiffusionPipeline.from_pretrained` would load), which the section's ``class``,
    when given, must name."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    kwargs = {"local_files_only": not allow_download}
    if spec.get("subfolder"):
        kwargs["subfolder"] = spec["subfolder"]
    try:
        saved = FlowMatchEulerDiscreteScheduler.load_config(spec["pretrained"], **kwargs).get("_class_name")
    except OSError as error:  # name the section, as `_from_pretrained` does
        raise OSError(f"section 'scheduler': {error}") from error
    where = str(Path(spec["pretrained"]) / spec.get("subfolder", ""))
    accepted = sorted(COMPONENT_CLASSES["scheduler"])
    if saved not in accepted:
        raise ValueError(
            f"section 'scheduler': {where!r} holds a {saved!r} scheduler config; ECHO samples its flow-matching "
            f"generator with one of {accepted}."
        )
    named = spec.get("class")
    if named is not None and named != saved:
        raise ValueError(
            f"section 'scheduler' names class {named!r} but {where!r} holds a {saved!r} config; loading one as the "
            f"other would drop its settings (UniPCMultistepScheduler's time shift is `flow_shift`, "
            f"FlowMatchEulerDiscreteScheduler's `shift`). Omit 'class' (or name {saved!r}) to load the folder's "
            f"scheduler, or build a {named} from 'config' alone (no 'pretrained')."
        )
    return saved


def _check_scheduler_overrides(cls, config: dict) -> None:
    """Scheduler settings a description gives must be arguments of its class (diffusers would ignore the others)."""
    unknown = sorted(set(config) - set(inspect.signature(cls.__init__).parameters) - {"self"})
    if unknown:
        raise ValueError(
            f"section 'scheduler' sets {unknown}, which {cls.__name__} does not take (UniPCMultistepScheduler's "
            "time shift is `flow_shift`, FlowMatchEulerDiscreteScheduler's `shift`)."
        )


def _build_one(section: str, spec: dict, torch_dtype: torch.dtype | None, allow_download: bool, default_seed: int):
    if section == "scheduler" and isinstance(spec, dict) and "pretrained" in spec:
        spec = dict(spec, **{"class": _saved_scheduler_class(spec, allow_download)})  # the folder's own class
    if not isinstance(spec, dict) or "class" not in spec:
        raise ValueError(f"section {section!r} must be a mapping with a 'class' key, got {spec!r}")
    sources = [key for key in ("pretrained", "from_wan") if key in spec]
    if len(sources) > 1:
        raise ValueError(f"section {section!r} gives both {sources}; give one source")
    if not sources and "config" not in spec:
        raise ValueError(f"section {section!r} needs one of 'pretrained', 'from_wan' or 'config'")
    name = spec["class"]
    cls = _import_class(name, section)
    config = dict(spec.get("config") or {})
    if section == "scheduler":
        _check_scheduler_overrides(cls, config)
    seed = int(spec.get("seed", default_seed))
    load_kwargs: dict[str, Any] = {"local_files_only": not allow_download}
    if spec.get("subfolder"):
        load_kwargs["subfolder"] = spec["subfolder"]
    if section in _MODEL_COMPONENTS:
        # Built on the meta device and loaded straight into the dtype (transformers ≥ 5 always does so).
        library = COMPONENT_CLASSES[section][name][0]
        load_kwargs["dtype" if library == "transformers" else "torch_dtype"] = torch_dtype
        load_kwargs["low_cpu_mem_usage"] = True
        load_kwargs["use_safetensors"] = True  # never unpickle a .bin
    if name == "AutoTokenizer":
        load_kwargs["trust_remote_code"] = False

    # 1. Pretrained weights from a folder or the local hub cache.
    if "pretrained" in spec:
        if config and section in ("scheduler", "feature_extractor"):
            load_kwargs.update(config)  # overrides such as the scheduler's `shift`
        elif config:
            raise ValueError(
                f"section {section!r} gives both 'pretrained' and 'config'; config overrides apply only to schedulers and feature extractors"
            )
        return _from_pretrained(cls, spec["pretrained"], section, load_kwargs)
    if "from_wan" in spec:
        if section != "transformer":
            raise ValueError(f"'from_wan' is only valid in the 'transformer' section, found in {section!r}")
        # The Wan weights are read one tensor at a time into the meta-built model; the ECHO modules are drawn from
        # the section's seed.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                return cls.from_wan(
                    spec["from_wan"],
                    torch_dtype=torch_dtype,
                    subfolder=spec.get("subfolder"),
                    local_files_only=not allow_download,
                    **config,
                )
            except OSError as error:  # name the section, as `_from_pretrained` does
                raise OSError(f"section {section!r}: {error}") from error

    # 2. Built from a config: seeded random weights.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if section == "tokenizer":
            return build_tiny_tokenizer(**config)
        if name in _TRANSFORMERS_CONFIGS:
            config_cls = getattr(importlib.import_module("transformers"), _TRANSFORMERS_CONFIGS[name])
            model = cls(config_cls(**config))
        else:
            model = cls(**config)
    if section in _MODEL_COMPONENTS:
        model = _cast(model, torch_dtype).eval()
    return model


def _check_seams(components: dict) -> None:
    transformer = components.get("transformer")
    audio = components.get("audio_encoder")
    text = components.get("text_encoder")
    tokenizer = components.get("tokenizer")
    lcu = components.get("context_encoder")
    if transformer is not None and audio is not None:
        expected = (audio.config.hidden_size, audio.config.num_hidden_layers + 1)
        got = (transformer.config.audio_dim, transformer.config.audio_num_layers)
        if got != expected:
            raise ValueError(
                f"transformer (audio_dim, audio_num_layers) = {got} but audio_encoder gives hidden_size "
                f"{expected[0]} with {expected[1]} hidden-state layers (num_hidden_layers + 1); expected {expected}"
            )
    if lcu is not None and audio is not None:
        expected = (audio.config.hidden_size, audio.config.num_hidden_layers + 1)
        got = (lcu.config.audio_dim, lcu.config.audio_num_layers)
        if got != expected:
            raise ValueError(
                f"context_encoder (audio_dim, audio_num_layers) = {got}, expected {expected} from audio_encoder"
            )
    if transformer is not None and text is not None and transformer.config.text_dim != text.config.d_model:
        raise ValueError(
            f"transformer text_dim = {transformer.config.text_dim} but text_encoder d_model = {text.config.d_model}"
        )
    if transformer is not None and lcu is not None:
        context_dim = transformer.config.context_dim
        if context_dim is None:
            context_dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
        if context_dim != lcu.config.context_dim:
            raise ValueError(
                f"transformer context_dim = {context_dim} but context_encoder context_dim = {lcu.config.context_dim}"
            )
    image = components.get("image_encoder")
    if transformer is not None and image is not None and transformer.config.image_dim != image.config.hidden_size:
        raise ValueError(
            f"transformer image_dim = {transformer.config.image_dim} but image_encoder hidden_size = "
            f"{image.config.hidden_size}; an I2V generator reads the image encoder's hidden states"
        )
    if text is not None and tokenizer is not None and len(tokenizer) > text.config.vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but text_encoder vocab_size = {text.config.vocab_size}; expected "
            f"vocab_size >= {len(tokenizer)}"
        )


def load_components(
    config: str | Path | dict,
    torch_dtype: torch.dtype | dict[str, torch.dtype] | None = None,
    allow_download: bool | None = None,
    only: list[str] | tuple[str, ...] | None = None,
) -> dict:
    r"""Build or load the named components of an ECHO model.

    Args:
        config (`str`, `Path` or `dict`): a model description (``configs/models/*.yaml``) or its parsed dict.
        torch_dtype (`torch.dtype` or `dict[str, torch.dtype]`, *optional*): dtype of the model components (the VAE,
            generator, encoders and LCU; schedulers, tokenizers and feature extractors have none). A dtype applies to
            every one; a dict (as in `DiffusionPipeline.from_pretrained`) maps section names, with ``"default"`` for
            the others. Defaults to the description: each section's ``torch_dtype``, else its top-level
            ``torch_dtype``, else float32. Float32 modules of a class (``_keep_in_fp32_modules``) stay float32.
        allow_download (`bool`, *optional*): let ``pretrained`` hub ids download; defaults to the description's
            top-level ``allow_download`` (itself `False`: local folders and the local cache only).
        only (`list[str]`, *optional*): build only these sections (e.g. ``["audio_encoder", "feature_extractor"]``
            for data preparation; ``"settings"`` for the settings). Seams are checked between the components that
            were built.

    Returns:
        `dict[str, Any]`: ``vae`` (`AutoencoderKLWan`), ``transformer`` (`EchoTransformer3DModel`), ``scheduler``
        (the section's class, or its folder's), ``audio_encoder`` (`Wav2Vec2Model`), ``feature_extractor``
        (`Wav2Vec2FeatureExtractor`), ``text_encoder`` (`UMT5EncoderModel` / `T5EncoderModel`), ``tokenizer`` and
        ``context_encoder`` (`LongRangeContextEncoder`), for I2V bases ``image_encoder`` (`CLIPVisionModel`) and
        ``image_processor`` (`CLIPImageProcessor`), and ``settings`` (a validated `EchoSettings` dict); the keys are
        exactly the sections present (and requested). The result can be passed as ``EchoPipeline(**components)``
        when the eight required components are present.
    """

    description = load_model_config(config)
    if allow_download is None:
        allow_download = bool(description.get("allow_download", False))
    default_seed = int(description.get("seed", 0))
    unknown = (
        set(description)
        - set(COMPONENT_CLASSES)
        - {"allow_download", "seed", "name", "description", "settings", "torch_dtype"}
    )
    if unknown:
        raise ValueError(f"model config has unknown sections {sorted(unknown)}; expected {sorted(COMPONENT_CLASSES)}")
    if only is not None:
        missing = [name for name in only if name not in description]
        if missing:
            raise ValueError(f"requested sections {missing} are not in the model config (it has {sorted(description)})")

    components = {}
    if "settings" in description and (only is None or "settings" in only):
        components["settings"] = EchoSettings.from_dict(
            description["settings"], source="model config section 'settings'"
        ).to_dict()
    for section in COMPONENT_CLASSES:
        if section not in description or (only is not None and section not in only):
            continue
        spec = description[section]
        dtype = _section_dtype(section, spec, description, torch_dtype)
        components[section] = _build_one(section, spec, dtype, allow_download, default_seed)
        if section == "scheduler":
            check_flow_scheduler(components[section])  # a scheduler that cannot sample the flow is refused here
    _check_seams(components)
    return components
