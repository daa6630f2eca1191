"""Data preparation: dyadic conversations → prepared clip folders (``echo-prep``).

Modules, in pipeline order:

- `data_prep.layouts`: find conversations in the Seamless Interaction or the plain pairs layout;
- `data_prep.media`: PyAV video decode/encode, WAV I/O, 16 kHz audio policy, 25 fps resampling;
- `data_prep.transcripts`: dataset transcripts and VAD, Whisper ASR, per-clip dialogue history;
- `data_prep.audio_features`: wav2vec2 hidden states, one row per video frame;
- `data_prep.stages`: one conversation → atomic clip folders, resumable; `data_prep.caches`: optional caches;
- `data_prep.cli`: the ``echo-prep`` command (process pool, progress bar, failure summary);
- `data_prep.testing`: tiny prepared sets and tiny audio/ASR models for tests and the offline demo.

Face-mesh landmarks of the crops are `echo.faces` and the framing `echo.framing` (shared with the pipeline); the
synthetic conversations and the demo set are the `synthetic` package, which both sides use without importing each
other. The clip folder format is ``docs/interfaces.md`` ("Prepared clip folder").
"""
