"""``python -m lipnet.certify``: see :mod:`lipnet.certify.cli`."""

import sys

from lipnet.certify.cli import main

if __name__ == "__main__":
    sys.exit(main())
