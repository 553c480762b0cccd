"""Benchmarks, run as `splitserve bench NAME`.

Each module listed here exposes `add_arguments(parser: argparse.ArgumentParser)` and
`run(args) -> int`; it prints a table and, with `--json PATH`, writes its results.
Modules are imported lazily so `splitserve --help` stays fast.
"""

BENCHES = {
    "engine": "splitserve.bench.engine",
    "transfer": "splitserve.bench.transfer",
    "longctx": "splitserve.bench.longctx",
    "serve": "splitserve.bench.serve",
    "attention": "splitserve.bench.attention",
}
