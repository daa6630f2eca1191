"""Synthetic conversations and the demo set: what the tests, the offline demo and the demo model's recipe render and
train on without any dataset.

- `synthetic.conversations`: the astronaut photo (and other identities) animated to espeak-ng speech, written in
  echo-prep's input layouts (Seamless Interaction, pairs); shipped recordings of the default dialogue and the tests'
  utterances in ``synthetic/speech/`` (espeak-ng is optional).
- `synthetic.demo_set`: the demo set (varied synthetic conversations prepared by the real ``echo-prep``, with a
  held-out split): ``python -m synthetic.demo_set --out data/demo``.

A package of its own over `echo`, so that `pipelines` (echo-demo) and `data_prep` (tests, benchmarks) both use it
while neither imports the other.
"""
