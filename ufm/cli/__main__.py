import sys
from ufm.cli import main
sys.exit(main())
