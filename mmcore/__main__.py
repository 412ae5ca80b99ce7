"""``python -m mmcore``: the same command line as the ``mmcore`` console script."""

from mmcore.cli.app import main

if __name__ == "__main__":
    main()
