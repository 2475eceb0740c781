"""`python -m engine.data prepare INPUT... --out DIR`: see engine/data/prepare.py."""
import sys

from engine.data.prepare import main

sys.exit(main())
