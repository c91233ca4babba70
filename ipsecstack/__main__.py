import sys

from ipsecstack.cli import main

sys.exit(main())
