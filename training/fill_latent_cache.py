"""``python -m training.fill_latent_cache --config <training yaml>``: fill the exact window-latent cache
(`training.latent_cache`) of a training config in advance, under ``accelerate launch`` sharded over the processes.

A command of its own above `training.train` (whose models and data it builds), so that the cache library, which the
training loop reads, imports nothing of the loop.
"""

from __future__ import annotations

import argparse

from training.config import load_config
from training.latent_cache import build
from training.train import build_data, build_models, make_accelerator


def main(argv: list[str] | None = None) -> dict:
    """``python -m training.fill_latent_cache --config <training yaml> [--set key=value ...]``: fill the cache of a
    training config in advance (under ``accelerate launch``, sharded over the processes)."""
    parser = argparse.ArgumentParser(description=main.__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    if not config.data.use_cached_latents:
        raise ValueError(
            f"{args.config!r} does not set data.use_cached_latents: its training would not read the cache."
        )
    accelerator, weight_dtype = make_accelerator(config)
    models, _ = build_models(config, accelerator, weight_dtype)
    dataset, _ = build_data(config, models)
    counts = build(dataset.latent_cache, dataset, models.vae, accelerator.process_index, accelerator.num_processes)
    print(
        f"[latent-cache] rank {accelerator.process_index}: {counts['encoded']} windows encoded, {counts['skipped']} "
        f"already cached, in {dataset.latent_cache.folder}",
        flush=True,
    )
    accelerator.wait_for_everyone()
    return counts


if __name__ == "__main__":
    main()
