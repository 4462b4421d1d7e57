"""`python cli.py ...` (and torchrun cli.py ...): the command line lives in pipeline/cli.py."""
from pipeline.cli import cli, main  # noqa: F401

if __name__ == "__main__":
    main()
