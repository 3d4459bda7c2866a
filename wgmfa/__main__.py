import sys

from wgmfa.cli import main

sys.exit(main())
