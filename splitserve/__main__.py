from splitserve.cli.main import main

# NOTE: guarded because vLLM starts its engine processes with multiprocessing's spawn,
# which re-imports `python -m splitserve`'s main module in each child (as __mp_main__):
# unguarded, every vLLM engine process would run the whole CLI again.
if __name__ == "__main__":
    raise SystemExit(main())
