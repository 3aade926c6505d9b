"""``python -m titans``: the ``titans`` command line where the console script is not installed (a source tree on
PYTHONPATH, as on the GPU machine of benchmarks/*_gpu.sh)."""

from titans.scripts.cli import main

if __name__ == "__main__":
    main()
