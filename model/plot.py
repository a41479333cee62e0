"""`python -m model.plot RUN_DIR`: draw a run's curves (alias of model/engine/plot.py). Nothing imports this file."""
import sys

from model.engine.plot import main

if __name__ == "__main__":
    sys.exit(main())
