"""Data preparation: dyadic conversations → prepared clip folders (``echo-prep``), and synthetic conversations.

Modules, in pipeline order:

- `data_prep.layouts`: find conversations in the Seamless Interaction or the plain pairs layout;
- `data_prep.media`: PyAV video decode/encode, WAV I/O, 16 kHz audio policy, 25 fps resampling;
- `data_prep.transcripts`: dataset transcripts and VAD, Whisper ASR, per-clip dialogue history;
- `data_prep.faces`: face-mesh landmarks of the crops (detection, tracking, causal smoothing and square crops are
  `echo.framing`, shared with the pipeline);
- `data_prep.audio_features`: wav2vec2 hidden states, one row per video frame;
- `data_prep.stages`: one conversation → atomic clip folders, resumable; `data_prep.caches`: optional caches;
- `data_prep.cli`: the ``echo-prep`` command (process pool, progress bar, failure summary);
- `data_prep.synthetic`: the astronaut photo animated to espeak-ng speech, in both layouts;
- `data_prep.testing`: tiny prepared sets and tiny audio/ASR models for tests and the offline demo.

The clip folder format is ``docs/interfaces.md`` ("Prepared clip folder").
"""
