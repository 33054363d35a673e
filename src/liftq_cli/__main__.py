"""`python -m liftq_cli ...`: the `liftq` command, for launchers that start modules
(`torchrun --nproc-per-node 8 -m liftq_cli quantize ...`)."""

from liftq_cli.cli.app import main

if __name__ == "__main__":
    main()
