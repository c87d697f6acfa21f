"""``python -m vlm_kernels info``: which backends exist here, and why the others do not."""

import argparse
import sys

from . import info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlm_kernels")
    parser.add_argument("command", choices=["info"], help="info: print every backend and whether it can run here")
    parser.parse_args(argv)
    print(info())
    return 0


if __name__ == "__main__":
    sys.exit(main())
