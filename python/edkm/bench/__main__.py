import sys

from edkm.cli import main

sys.exit(main(["bench"] + sys.argv[1:]))
