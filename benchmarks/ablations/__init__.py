"""Quality comparisons on the digits task, each
`python -m benchmarks.ablations.NAME`.

* `digits_quantizers`: the stage-1 quantizers trained side by side.
* `digits_transformer_options`: stage-2 GPT options trained side by side and
  judged by the digits classifier.
"""
