"""fastft benchmarks: ``python -m benchmarks.run --suite cpu|gpu [--only NAME]``.

Each ``benchmarks/bench_<name>.py`` exposes ``run(suite) -> list[dict]`` built with the helpers of
``benchmarks.common``; ``benchmarks.run`` records the rows under ``benchmarks/results/``.
"""
