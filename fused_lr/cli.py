"""The ``fused-lr`` command."""

import sys


def main(argv=None) -> int:
    print("fused-lr: the demo is not built yet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
