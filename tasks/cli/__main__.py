import sys

from tasks.cli.commands import main

sys.exit(main())
