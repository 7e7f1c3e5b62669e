import sys

from memctl_cli.main import main

sys.exit(main())
